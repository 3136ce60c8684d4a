// The int8-activation group kernel, parametrised by how a dot of 4 bytes is done (Dot): included
// by quant_a8_avx2.cpp (maddubs + madd) and quant_a8_vnni.cpp (vpdpbusd). Everything here has
// internal linkage, so the copy compiled for VNNI never stands in for the AVX2 one.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "quant_a8.h"

namespace quire_quant {
namespace {

constexpr int64_t kA8Q4_0 = 2, kA8Q4_1 = 3, kA8Q8_0 = 8;  // GGML type ids (quant_blocks.h)
// How far ahead a group prefetches its one stream of weight bytes (as interleaved_group does).
constexpr int64_t kA8PrefetchBytes = 1024;
// Rows of x per pass over a group's weights (which stay in L1 for the next pass).
constexpr int kA8MaxRows = 4;

inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// y[r][0..7] for MR rows of x (from row r0) and one group of 8 output rows. Per block, each row of
// x gets an int32 vector of the 8 exact integer dots sum(qx * qw) (lanes = output rows); it is
// converted once and scaled by the 8 rows' d times x's block scale, so no horizontal sums.
template <class Dot, int64_t TYPE, int MR>
inline void a8_group(const A8Problem& p, int64_t r0, const uint8_t* w, float* y, const float* bias) {
  constexpr int64_t head = TYPE == kA8Q4_1 ? 32 : 16;
  constexpr int64_t chunk = 8 * (TYPE == kA8Q8_0 ? 34 : TYPE == kA8Q4_1 ? 20 : 18);
  // Two independent dot chains per row while few rows give few chains (a dot's latency is 5 cycles).
  constexpr int NA = MR <= 2 ? 2 : 1;
  const int64_t k = p.x.k, nb = k / 32;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m256 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * chunk;
    for (int64_t line = 0; line < chunk; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(blk + kA8PrefetchBytes + line), _MM_HINT_T0);
    const uint8_t* qs = blk + head;
    __m256i dot[MR][NA];
    for (int r = 0; r < MR; ++r)
      for (int a = 0; a < NA; ++a) dot[r][a] = _mm256_setzero_si256();
    if constexpr (TYPE == kA8Q8_0) {
      // vpdpbusd multiplies unsigned by signed bytes: |w| times x with w's sign (x is in
      // [-127, 127], so negating it never overflows).
      for (int i = 0; i < 8; ++i) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * i));
        const __m256i aw = _mm256_abs_epi8(wv);
        for (int r = 0; r < MR; ++r) {
          const __m256i xv = broadcast4(p.x.q + (r0 + r) * k + 32 * b + 4 * i);
          dot[r][i % NA] = Dot::dot(dot[r][i % NA], aw, _mm256_sign_epi8(xv, wv));
        }
      }
    } else {
      // Byte j of a row holds quant j (low nibble) and j + 16 (high): the low nibbles of load i
      // pair with x[4i .. 4i + 3], the high ones with x[16 + 4i .. 16 + 4i + 3].
      for (int i = 0; i < 4; ++i) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * i));
        const __m256i lo = _mm256_and_si256(wv, low4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low4);
        for (int r = 0; r < MR; ++r) {
          const int8_t* xb = p.x.q + (r0 + r) * k + 32 * b;
          dot[r][i % NA] = Dot::dot2(dot[r][i % NA], lo, broadcast4(xb + 4 * i), hi, broadcast4(xb + 16 + 4 * i));
        }
      }
    }
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
    for (int r = 0; r < MR; ++r) {
      const int64_t xb = (r0 + r) * nb + b;
      __m256i s = dot[r][0];
      for (int a = 1; a < NA; ++a) s = _mm256_add_epi32(s, dot[r][a]);
      // Q4_0's quants are q - 8: subtract 8 * sum(qx) from the exact integer dot.
      if constexpr (TYPE == kA8Q4_0) s = _mm256_sub_epi32(s, _mm256_set1_epi32(8 * p.x.qsum[xb]));
      acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(p.x.d[xb])), _mm256_cvtepi32_ps(s), acc[r]);
      if constexpr (TYPE == kA8Q4_1) {
        const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16)));
        acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(p.x.dsum[xb]), acc[r]);
      }
    }
  }
  const __m256 bv = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  for (int r = 0; r < MR; ++r) _mm256_storeu_ps(y + r * p.ldy, _mm256_add_ps(acc[r], bv));
}

template <class Dot, int64_t TYPE>
inline void a8_groups_typed(const A8Problem& p, int64_t g0, int64_t g1) {
  const int64_t group_bytes = 8 * p.row_bytes;
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* w = p.w + g * group_bytes;
    const float* bias = p.bias ? p.bias + 8 * g : nullptr;
    for (int64_t r0 = 0; r0 < p.m; r0 += kA8MaxRows) {
      float* y = p.y + r0 * p.ldy + 8 * g;
      switch (p.m - r0) {
        case 1: a8_group<Dot, TYPE, 1>(p, r0, w, y, bias); break;
        case 2: a8_group<Dot, TYPE, 2>(p, r0, w, y, bias); break;
        case 3: a8_group<Dot, TYPE, 3>(p, r0, w, y, bias); break;
        default: a8_group<Dot, TYPE, 4>(p, r0, w, y, bias); break;
      }
    }
  }
}

template <class Dot>
inline void a8_groups_with(const A8Problem& p, int64_t g0, int64_t g1) {
  switch (p.type) {
    case kA8Q8_0: a8_groups_typed<Dot, kA8Q8_0>(p, g0, g1); break;
    case kA8Q4_0: a8_groups_typed<Dot, kA8Q4_0>(p, g0, g1); break;
    default: a8_groups_typed<Dot, kA8Q4_1>(p, g0, g1); break;
  }
}

}  // namespace
}  // namespace quire_quant
