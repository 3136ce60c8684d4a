// The int8-activation kernel with vpdpbusd (4 u8 x s8 products summed into each int32 lane in one
// instruction, no saturation): AVX512-VNNI (ymm form, needs AVX512VL) in the AVX-512 tiers,
// AVX-VNNI in the avx2 tier (Intel Alder Lake / Sapphire Rapids and later, AMD Zen 5). The tiers'
// -march flags do not include either, so this unit enables it with a target pragma, and
// quant_a8.cpp calls it only where the CPU reports the feature (a8_vnni_available). Only this
// unit's own code (internal linkage, no standard-library templates) is compiled for the target.
#include "quant_a8.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && defined(__GNUC__)
// Every header before the pragma: the intrinsics carry their own target attributes, and nothing
// else may be compiled for the target.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#ifdef __AVX512VL__
#pragma GCC target("avx512vnni,avx512vl")
#define QUIRE_A8_VNNI_FEATURE "avx512vnni"
#define QUIRE_DPBUSD _mm256_dpbusd_epi32
#else
#pragma GCC target("avxvnni")
#define QUIRE_A8_VNNI_FEATURE "avxvnni"
#define QUIRE_DPBUSD _mm256_dpbusd_avx_epi32
#endif

#include "quant_a8_kernel.h"

namespace quire_quant {
namespace {

struct DotVnni {
  static __m256i dot(__m256i acc, __m256i u, __m256i s) { return QUIRE_DPBUSD(acc, u, s); }
  static __m256i dot2(__m256i acc, __m256i u0, __m256i s0, __m256i u1, __m256i s1) {
    return QUIRE_DPBUSD(QUIRE_DPBUSD(acc, u0, s0), u1, s1);
  }
};

}  // namespace

void a8_groups_vnni(const A8Problem& p, int64_t g0, int64_t g1) { a8_groups_with<DotVnni>(p, g0, g1); }

}  // namespace quire_quant

#pragma GCC reset_options

namespace quire_quant {
bool a8_vnni_available() {
  __builtin_cpu_init();
  return __builtin_cpu_supports(QUIRE_A8_VNNI_FEATURE);
}
}  // namespace quire_quant

#else
namespace quire_quant {
void a8_groups_vnni(const A8Problem&, int64_t, int64_t) {}
bool a8_vnni_available() { return false; }
}  // namespace quire_quant
#endif
