// AVX2 pieces shared by the direct path (quant_gemm.cpp) and the panel path (quant_panel.cpp):
// block loads and exact vectorised decoders. QUIRE_QUANT_AVX2 is defined where they exist (the
// avx2 tier and up); portable builds use quant_blocks.h's scalar decoders only.
#pragma once

#include <cstdint>
#include <cstring>

#include "quant_blocks.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define QUIRE_QUANT_AVX2 1
#endif

#ifdef QUIRE_QUANT_AVX2
namespace quire_quant {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float f16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// One 32-weight block of Q8_0 / Q4_0 / Q4_1: its quants as fp32 in q[0..3] (elements 8i..8i+7),
// and (d, m) such that the block's dot with x is d * dot(x, q) + m * sum(x).
template <int64_t TYPE>
inline void load_block32(const uint8_t* b, __m256 q[4], float* d, float* m) {
  *d = f16_at(b);
  if constexpr (TYPE == quire_quant::kQ8_0) {
    *m = 0.0f;
    for (int i = 0; i < 4; ++i)
      q[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + 8 * i))));
  } else {
    const uint8_t* qs = b + (TYPE == quire_quant::kQ4_1 ? 4 : 2);
    *m = TYPE == quire_quant::kQ4_1 ? f16_at(b + 2) : -8.0f * *d;  // Q4_0: d (q - 8) = d q - 8 d
    // Byte i holds element i (low nibble) and i + 16 (high nibble).
    const __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs)));
    const __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8)));
    const __m256i mask = _mm256_set1_epi32(0x0F);
    q[0] = _mm256_cvtepi32_ps(_mm256_and_si256(lo, mask));
    q[1] = _mm256_cvtepi32_ps(_mm256_and_si256(hi, mask));
    q[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(lo, 4));
    q[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(hi, 4));
  }
}

// Exact vectorised decoders of a Q4_K / Q5_K / Q6_K super-block into out[0..255] (stride must be 1), for
// the panel fill. Every product is exact (see quant_blocks.h), so fmsub rounds like gguf-py.
inline __m256i widen_bytes(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

inline __m256i qh_bit4(__m256i qh, int bit) {  // bit `bit` of each 32-bit lane, moved to bit 4
  return _mm256_and_si256(_mm256_srl_epi32(_mm256_slli_epi32(qh, 4), _mm_cvtsi32_si128(bit)), _mm256_set1_epi32(0x10));
}

template <bool FIVE_BIT>
inline void decode_k_avx2(const uint8_t* block, float* out, int64_t /*stride*/) {
  const float d = f16_at(block), dmin = f16_at(block + 2);
  const uint8_t* qs = block + (FIVE_BIT ? 48 : 16);
  const __m256i mask = _mm256_set1_epi32(0x0F);
  for (int g = 0; g < 4; ++g) {
    float sc_lo, mn_lo, sc_hi, mn_hi;
    quire_quant::k_scale_min(block + 4, 2 * g, &sc_lo, &mn_lo);
    quire_quant::k_scale_min(block + 4, 2 * g + 1, &sc_hi, &mn_hi);
    const __m256 scale_lo = _mm256_set1_ps(d * sc_lo), offset_lo = _mm256_set1_ps(dmin * mn_lo);
    const __m256 scale_hi = _mm256_set1_ps(d * sc_hi), offset_hi = _mm256_set1_ps(dmin * mn_hi);
    for (int i = 0; i < 4; ++i) {
      const __m256i wide = widen_bytes(qs + 32 * g + 8 * i);
      __m256i q_lo = _mm256_and_si256(wide, mask), q_hi = _mm256_srli_epi32(wide, 4);
      if constexpr (FIVE_BIT) {  // bit 2g (low nibbles) / 2g + 1 (high) of qh[l] is bit 4 of element l
        const __m256i qh = widen_bytes(block + 16 + 8 * i);
        q_lo = _mm256_or_si256(q_lo, qh_bit4(qh, 2 * g));
        q_hi = _mm256_or_si256(q_hi, qh_bit4(qh, 2 * g + 1));
      }
      const __m256 lo = _mm256_cvtepi32_ps(q_lo);
      const __m256 hi = _mm256_cvtepi32_ps(q_hi);
      _mm256_storeu_ps(out + 64 * g + 8 * i, _mm256_fmsub_ps(scale_lo, lo, offset_lo));
      _mm256_storeu_ps(out + 64 * g + 32 + 8 * i, _mm256_fmsub_ps(scale_hi, hi, offset_hi));
    }
  }
}

inline void decode_q6_k_avx2(const uint8_t* block, float* out, int64_t /*stride*/) {
  const int8_t* sc = reinterpret_cast<const int8_t*>(block + 192);
  const float d = f16_at(block + 208);
  const __m256i low4 = _mm256_set1_epi32(0x0F), two_bits = _mm256_set1_epi32(0x30);
  const __m256i bias32 = _mm256_set1_epi32(32);
  for (int h = 0; h < 2; ++h)
    for (int l0 = 0; l0 < 32; l0 += 8) {
      const __m256i qh = widen_bytes(block + 128 + 32 * h + l0);
      for (int s = 0; s < 4; ++s) {
        const __m256i ql = widen_bytes(block + 64 * h + 32 * (s & 1) + l0);
        const __m256i low = _mm256_and_si256(_mm256_srl_epi32(ql, _mm_cvtsi32_si128(4 * (s >> 1))), low4);
        const __m256i high =
            _mm256_and_si256(_mm256_slli_epi32(_mm256_srl_epi32(qh, _mm_cvtsi32_si128(2 * s)), 4), two_bits);
        const __m256 q = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_or_si256(low, high), bias32));
        const int e = 128 * h + 32 * s + l0;
        _mm256_storeu_ps(out + e, _mm256_mul_ps(_mm256_set1_ps(d * static_cast<float>(sc[e / 16])), q));
      }
    }
}

}  // namespace quire_quant
#endif  // QUIRE_QUANT_AVX2
