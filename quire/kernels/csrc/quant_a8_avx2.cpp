// The int8-activation kernel without VNNI (AVX2: every x86 tier from avx2 up); see quant_a8_kernel.h.
#include "quant_a8.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include "quant_a8_kernel.h"

namespace quire_quant {
namespace {

// A 4-byte dot per 32-bit lane as vpmaddubsw (u8 x s8 pairs summed into int16, saturating) and
// vpmaddwd by ones (int16 pairs into int32). No pair can saturate: Q8_0 gives |w| <= 128 and
// |x| <= 127 (2 * 128 * 127 < 32767), the 4-bit formats w <= 15.
struct DotMaddubs {
  static __m256i dot(__m256i acc, __m256i u, __m256i s) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
  }
  // Two dots of 4-bit weights: their int16 pair sums (each <= 2 * 15 * 127) are added before the
  // widening, one vpmaddwd for both.
  static __m256i dot2(__m256i acc, __m256i u0, __m256i s0, __m256i u1, __m256i s1) {
    const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(u0, s0), _mm256_maddubs_epi16(u1, s1));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
};

}  // namespace

void a8_groups_avx2(const A8Problem& p, int64_t g0, int64_t g1) { a8_groups_with<DotMaddubs>(p, g0, g1); }

}  // namespace quire_quant
#endif
