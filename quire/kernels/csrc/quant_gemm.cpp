// quant_linear: y = x W^T (+ b) for fp32 x against a weight kept in a GGUF block format, decoded
// inside the product. Activations stay fp32 (only the weight is quantized), so the result is the
// fp32 product with the dequantized weight up to summation order.
//
// The weight keeps GGUF's own layout (each output row's blocks contiguous), so what stays resident
// is exactly the file's bytes, and one output row is one sequential stream from memory.
//
// Two paths, by the number of rows of x:
// - Few rows (a decode step): per output row and block, the integer quants are widened to fp32
//   and dotted with x, and the block's scale is applied once to that dot: for Q4_1 a block adds
//   d * sum(x_i q_i) + m * sum(x_i) instead of sum(x_i (d q_i + m)), with the per-block sums of x
//   computed once per call (Q4_0 is the same with m = -8 d; Q8_0 has no offset). This reorders the
//   fp32 arithmetic (different roundings, same value up to ~1e-7 relative per block) and saves a
//   multiply and an add per weight; the x rows stay in L1 while the weight streams through once.
//   AVX2 builds, every format: Q4_K/Q5_K's 32-weight sub-blocks work the same way (d * sc_j and
//   -dmin * m_j for d and m), Q6_K is its quants minus 32, times d * sc per 16 weights.
//   Q8_0 / Q4_0 / Q4_1 weights arrive instead in the interleaved layout (kInterleavedFlag: 8
//   output rows per group, their scales and quant bytes transposed), where interleaved_group
//   keeps the 8 columns in the lanes of one accumulator: per k step one 8-byte load, one
//   conversion and one FMA per x row, with no horizontal sums (about 1.3x the speed of the
//   row-layout kernels, which remain for GGUF-layout callers and the K-quants).
// - More rows, and the portable build: the panel path (quant_panel.cpp), which decodes each
//   weight once per call into fp32 panels and runs a register-tiled kernel over them.
#include "quant_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "quant_a8.h"
#include "quant_blocks.h"
#include "quant_panel.h"
#include "quant_simd.h"

namespace quire_quant {
namespace {

// Up to this many rows of x take the direct path: at 4 rows it measured ~15% faster than the panel
// path (whose fill costs about as much as 4-5 rows of FMAs), at 5 rows slower.
constexpr int64_t kDirectMaxRows = 4;
// How many blocks ahead direct_tile8 prefetches each of its rows.
constexpr int64_t kPrefetchBlocks = 16;
// How far ahead interleaved_group prefetches its (single) stream of weight bytes.
constexpr int64_t kInterleavedPrefetchBytes = 1024;

const BlockFormat& checked_format(int64_t quant_type) {
  const BlockFormat* format = quire_quant::find_format(quant_type);
  TORCH_CHECK(format != nullptr, "unknown quant_type ", quant_type, " (a GGML type id: 2, 3, 8, 12, 13 or 14)");
  return *format;
}

void check_raw(const torch::Tensor& raw, const BlockFormat& format, int64_t in_features) {
  TORCH_CHECK(raw.device().is_cpu() && raw.scalar_type() == torch::kUInt8 && raw.dim() == 2 && raw.is_contiguous(),
              "raw must be a contiguous uint8 [out_features, row_bytes] CPU tensor");
  TORCH_CHECK(in_features > 0 && in_features % format.elems == 0, "in_features must be a positive multiple of ",
              format.elems);
  TORCH_CHECK(raw.size(1) == in_features / format.elems * format.bytes, "raw has ", raw.size(1),
              " bytes per row; in_features ", in_features, " needs ", in_features / format.elems * format.bytes);
}

#ifdef QUIRE_QUANT_AVX2
// y[r][c] for MR rows of x and NC consecutive output rows of the weight (w: the first one's bytes).
// NC output rows at once give NC independent accumulator chains per x row (an FMA's latency would
// otherwise bound a single chain) and share each load of x.
template <int64_t TYPE, int MR, int NC>
void direct_tile(const float* x, int64_t k_dim, const float* xsum, int64_t num_blocks, const uint8_t* w,
                 int64_t row_bytes, int64_t block_bytes, float* y, int64_t ldy, const float* bias) {
  __m256 acc[MR][NC];
  float offset[MR][NC];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) {
      acc[r][c] = _mm256_setzero_ps();
      offset[r][c] = 0.0f;
    }
  for (int64_t b = 0; b < num_blocks; ++b) {
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) {
      __m256 q[4];
      float d, m;
      load_block32<TYPE>(w + c * row_bytes + b * block_bytes, q, &d, &m);
      const __m256 dv = _mm256_set1_ps(d);
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        const float* xb = x + r * k_dim + b * 32;
        __m256 t0 = _mm256_mul_ps(_mm256_loadu_ps(xb), q[0]);
        __m256 t1 = _mm256_mul_ps(_mm256_loadu_ps(xb + 8), q[1]);
        t0 = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 16), q[2], t0);
        t1 = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 24), q[3], t1);
        acc[r][c] = _mm256_fmadd_ps(dv, _mm256_add_ps(t0, t1), acc[r][c]);
        offset[r][c] += m * xsum[r * num_blocks + b];
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) y[r * ldy + c] = hsum(acc[r][c]) + offset[r][c] + (bias ? bias[c] : 0.0f);
}

// Eight f16 values, one per output row (p + c * stride), widened to a vector over the rows.
// (One vpinsrw from memory per value: through a stack array it was ~2x the instructions.)
inline __m256 gather_f16x8(const uint8_t* p, int64_t stride) {
  auto at = [&](int c) {
    uint16_t h;
    std::memcpy(&h, p + c * stride, 2);
    return static_cast<int>(h);
  };
  __m128i v = _mm_cvtsi32_si128(at(0));
  v = _mm_insert_epi16(v, at(1), 1);
  v = _mm_insert_epi16(v, at(2), 2);
  v = _mm_insert_epi16(v, at(3), 3);
  v = _mm_insert_epi16(v, at(4), 4);
  v = _mm_insert_epi16(v, at(5), 5);
  v = _mm_insert_epi16(v, at(6), 6);
  v = _mm_insert_epi16(v, at(7), 7);
  return _mm256_cvtph_ps(v);
}

// [sum(v[0]), ..., sum(v[7])]: eight horizontal sums as one vector.
inline __m256 hsum8(const __m256 v[8]) {
  const __m256 a0 = _mm256_hadd_ps(v[0], v[1]), a1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 a2 = _mm256_hadd_ps(v[4], v[5]), a3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 b0 = _mm256_hadd_ps(a0, a1), b1 = _mm256_hadd_ps(a2, a3);
  // b0 = [partial sums of v0..v3 | their other halves], b1 likewise for v4..v7.
  const __m256 low = _mm256_insertf128_ps(b0, _mm256_castps256_ps128(b1), 1);
  const __m256 high = _mm256_insertf128_ps(b1, _mm256_extractf128_ps(b0, 1), 0);
  return _mm256_add_ps(low, high);
}

// One row of x against 8 output rows: per block, the 8 dots of x with the integer quants are
// reduced to one vector over the 8 rows, and the rows' scales and offsets are applied to it as
// vectors (instead of a broadcast, a multiply-add and scalar offset work per row and block:
// ~1.2x faster on Q4_1, one thread, weight in cache).
template <int64_t TYPE>
void direct_tile8(const float* x, const float* xsum, int64_t num_blocks, const uint8_t* w, int64_t row_bytes,
                  int64_t block_bytes, float* y, const float* bias) {
  __m256 acc = _mm256_setzero_ps(), offset = _mm256_setzero_ps();
  for (int64_t b = 0; b < num_blocks; ++b) {
    const float* xb = x + b * 32;
    const __m256 x0 = _mm256_loadu_ps(xb), x1 = _mm256_loadu_ps(xb + 8);
    const __m256 x2 = _mm256_loadu_ps(xb + 16), x3 = _mm256_loadu_ps(xb + 24);
    __m256 dots[8];
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) {
      // Eight interleaved row streams defeat the hardware prefetcher: fetch ahead explicitly.
      _mm_prefetch(reinterpret_cast<const char*>(w + c * row_bytes + (b + kPrefetchBlocks) * block_bytes), _MM_HINT_T0);
      __m256 q[4];
      float d, m;
      load_block32<TYPE>(w + c * row_bytes + b * block_bytes, q, &d, &m);
      __m256 t = _mm256_mul_ps(x0, q[0]);
      t = _mm256_fmadd_ps(x1, q[1], t);
      t = _mm256_fmadd_ps(x2, q[2], t);
      dots[c] = _mm256_fmadd_ps(x3, q[3], t);
    }
    const uint8_t* scales = w + b * block_bytes;
    const __m256 d = gather_f16x8(scales, row_bytes);
    acc = _mm256_fmadd_ps(d, hsum8(dots), acc);
    if constexpr (TYPE == quire_quant::kQ4_1) {
      offset = _mm256_fmadd_ps(gather_f16x8(scales + 2, row_bytes), _mm256_set1_ps(xsum[b]), offset);
    } else if constexpr (TYPE == quire_quant::kQ4_0) {
      offset = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(-8.0f)), _mm256_set1_ps(xsum[b]), offset);
    }
  }
  __m256 out = _mm256_add_ps(acc, offset);
  if (bias) out = _mm256_add_ps(out, _mm256_loadu_ps(bias));
  _mm256_storeu_ps(y, out);
}

// Q4_K on the direct path: per 32-weight sub-block j, the dot with the integer quants times the
// sub-block scale d * sc_j, minus dmin * m_j times the sub-block's sum of x (per-32 sums of x
// computed once per call, as for Q4_1). Scales and mins unpack once per 256 weights.
// Q5_K is the same with a fifth bit per weight: bit j of qh[l] for element l of sub-block j.
template <int MR, bool FIVE_BIT>
void direct_k_row(const float* x, int64_t k_dim, const float* xsum, int64_t num_blocks, const uint8_t* w,
                  float* y, int64_t ldy, const float* bias) {
  constexpr int64_t block_bytes = FIVE_BIT ? 176 : 144, quant_offset = FIVE_BIT ? 48 : 16;
  __m256 acc[MR];
  float offset[MR];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) {
    acc[r] = _mm256_setzero_ps();
    offset[r] = 0.0f;
  }
  const __m256i mask = _mm256_set1_epi32(0x0F);
  for (int64_t b = 0; b < num_blocks; ++b) {
    const uint8_t* block = w + b * block_bytes;
    const float d = f16_at(block), dmin = f16_at(block + 2);
    float scale[8], minimum[8];
    for (int j = 0; j < 8; ++j) {
      float sc, mn;
      quire_quant::k_scale_min(block + 4, j, &sc, &mn);
      scale[j] = d * sc;
      minimum[j] = dmin * mn;
    }
    for (int g = 0; g < 4; ++g) {  // 32 bytes: sub-block 2g in the low nibbles, 2g + 1 in the high
      const uint8_t* qs = block + quant_offset + 32 * g;
      __m256 lo[4], hi[4];
      for (int i = 0; i < 4; ++i) {
        __m256i wide_lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8 * i)));
        __m256i wide_hi = _mm256_srli_epi32(wide_lo, 4);
        wide_lo = _mm256_and_si256(wide_lo, mask);
        if constexpr (FIVE_BIT) {
          const __m256i qh = widen_bytes(block + 16 + 8 * i);
          // bit 2g of qh is bit 4 of the low nibbles' quants, bit 2g + 1 of the high ones'
          wide_lo = _mm256_or_si256(wide_lo, qh_bit4(qh, 2 * g));
          wide_hi = _mm256_or_si256(wide_hi, qh_bit4(qh, 2 * g + 1));
        }
        lo[i] = _mm256_cvtepi32_ps(wide_lo);
        hi[i] = _mm256_cvtepi32_ps(wide_hi);
      }
      const __m256 scale_lo = _mm256_set1_ps(scale[2 * g]), scale_hi = _mm256_set1_ps(scale[2 * g + 1]);
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        const float* xb = x + r * k_dim + b * 256 + 64 * g;
        __m256 t_lo = _mm256_mul_ps(_mm256_loadu_ps(xb), lo[0]);
        __m256 t_hi = _mm256_mul_ps(_mm256_loadu_ps(xb + 32), hi[0]);
        for (int i = 1; i < 4; ++i) {
          t_lo = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8 * i), lo[i], t_lo);
          t_hi = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 32 + 8 * i), hi[i], t_hi);
        }
        acc[r] = _mm256_fmadd_ps(scale_lo, t_lo, acc[r]);
        acc[r] = _mm256_fmadd_ps(scale_hi, t_hi, acc[r]);
        const float* sums = xsum + r * (k_dim / 32) + b * 8 + 2 * g;
        offset[r] += minimum[2 * g] * sums[0] + minimum[2 * g + 1] * sums[1];
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) y[r * ldy] = hsum(acc[r]) - offset[r] + (bias ? *bias : 0.0f);
}

// Q6_K on the direct path: per 16 weights, the dot with the integer quants (6 bits from ql's
// nibble and qh's 2-bit field, minus 32, as in decode_q6_k) times d * sc.
template <int MR>
void direct_q6_k_row(const float* x, int64_t k_dim, int64_t num_blocks, const uint8_t* w, float* y, int64_t ldy,
                     const float* bias) {
  __m256 acc[MR];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i low4 = _mm256_set1_epi32(0x0F), two_bits = _mm256_set1_epi32(0x30);
  const __m256i bias32 = _mm256_set1_epi32(32);
  auto widen = [](const uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  };
  for (int64_t b = 0; b < num_blocks; ++b) {
    const uint8_t* block = w + b * 210;
    const int8_t* sc = reinterpret_cast<const int8_t*>(block + 192);
    const float d = f16_at(block + 208);
    for (int h = 0; h < 2; ++h) {
      for (int l0 = 0; l0 < 32; l0 += 16) {
        const __m256i qh0 = widen(block + 128 + 32 * h + l0), qh1 = widen(block + 128 + 32 * h + l0 + 8);
        for (int s = 0; s < 4; ++s) {
          const uint8_t* ql = block + 64 * h + 32 * (s & 1) + l0;
          const __m128i nibble_shift = _mm_cvtsi32_si128(4 * (s >> 1));
          const __m128i high_shift = _mm_cvtsi32_si128(2 * s);
          auto quants = [&](const uint8_t* low_bytes, __m256i high_bytes) {
            const __m256i low = _mm256_and_si256(_mm256_srl_epi32(widen(low_bytes), nibble_shift), low4);
            const __m256i high =
                _mm256_and_si256(_mm256_slli_epi32(_mm256_srl_epi32(high_bytes, high_shift), 4), two_bits);
            return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_or_si256(low, high), bias32));
          };
          const __m256 q0 = quants(ql, qh0), q1 = quants(ql + 8, qh1);
          const int64_t e = 128 * h + 32 * s + l0;  // first of these 16 elements
          const __m256 scale = _mm256_set1_ps(d * static_cast<float>(sc[e / 16]));
#pragma GCC unroll 4
          for (int r = 0; r < MR; ++r) {
            const float* xb = x + r * k_dim + b * 256 + e;
            const __m256 t = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8), q1, _mm256_mul_ps(_mm256_loadu_ps(xb), q0));
            acc[r] = _mm256_fmadd_ps(scale, t, acc[r]);
          }
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) y[r * ldy] = hsum(acc[r]) + (bias ? *bias : 0.0f);
}

template <int64_t TYPE, int MR>
void direct_rows_q32(const float* x, int64_t k_dim, const float* xsum, const uint8_t* raw, int64_t row_bytes,
                     int64_t block_bytes, int64_t n_dim, const float* bias, float* y);

template <int64_t TYPE, int MR>
void direct_rows(const float* x, int64_t k_dim, const float* xsum, const uint8_t* raw, int64_t row_bytes,
                 int64_t block_bytes, int64_t n_dim, const float* bias, float* y) {
  if constexpr (TYPE == quire_quant::kQ6_K) {
    at::parallel_for(0, n_dim, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        direct_q6_k_row<MR>(x, k_dim, k_dim / 256, raw + n * row_bytes, y + n, n_dim, bias ? bias + n : nullptr);
    });
  } else if constexpr (TYPE == quire_quant::kQ4_K) {
    at::parallel_for(0, n_dim, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        direct_k_row<MR, false>(x, k_dim, xsum, k_dim / 256, raw + n * row_bytes, y + n, n_dim,
                                bias ? bias + n : nullptr);
    });
  } else if constexpr (TYPE == quire_quant::kQ5_K) {
    at::parallel_for(0, n_dim, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        direct_k_row<MR, true>(x, k_dim, xsum, k_dim / 256, raw + n * row_bytes, y + n, n_dim,
                               bias ? bias + n : nullptr);
    });
  } else {
    direct_rows_q32<TYPE, MR>(x, k_dim, xsum, raw, row_bytes, block_bytes, n_dim, bias, y);
  }
}

template <int64_t TYPE, int MR>
void direct_rows_q32(const float* x, int64_t k_dim, const float* xsum, const uint8_t* raw, int64_t row_bytes,
                     int64_t block_bytes, int64_t n_dim, const float* bias, float* y) {
  constexpr int NC = MR == 1 ? 8 : 2;
  const int64_t num_blocks = k_dim / 32;
  const int64_t groups = (n_dim + NC - 1) / NC;
  at::parallel_for(0, groups, 8, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t n = g * NC;
      const float* tile_bias = bias ? bias + n : nullptr;
      if (MR == 1 && n + NC <= n_dim) {
        direct_tile8<TYPE>(x, xsum, num_blocks, raw + n * row_bytes, row_bytes, block_bytes, y + n, tile_bias);
      } else if (n + NC <= n_dim) {
        direct_tile<TYPE, MR, NC>(x, k_dim, xsum, num_blocks, raw + n * row_bytes, row_bytes, block_bytes, y + n,
                                  n_dim, tile_bias);
      } else {
        for (int64_t c = n; c < n_dim; ++c)
          direct_tile<TYPE, MR, 1>(x, k_dim, xsum, num_blocks, raw + c * row_bytes, row_bytes, block_bytes, y + c,
                                   n_dim, bias ? bias + c : nullptr);
      }
    }
  });
}

// Per row of x, the sum of each run of 32 values (one per 32-weight block): the "m * sum(x)"
// term of Q4_1 and the like, computed once per call instead of once per output column.
std::vector<float> block_sums_of_x(const float* x, int64_t m_dim, int64_t k_dim) {
  const int64_t num_blocks = k_dim / 32;
  std::vector<float> xsum(static_cast<size_t>(m_dim * num_blocks));
  for (int64_t r = 0; r < m_dim; ++r)
    for (int64_t b = 0; b < num_blocks; ++b) {
      const float* xb = x + r * k_dim + b * 32;
      __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(xb), _mm256_loadu_ps(xb + 8)),
                               _mm256_add_ps(_mm256_loadu_ps(xb + 16), _mm256_loadu_ps(xb + 24)));
      xsum[static_cast<size_t>(r * num_blocks + b)] = hsum(s);
    }
  return xsum;
}

template <int64_t TYPE>
void direct_linear(const float* x, int64_t m_dim, int64_t k_dim, const uint8_t* raw, int64_t row_bytes,
                   int64_t block_bytes, int64_t n_dim, const float* bias, float* y) {
  const int64_t num_blocks = k_dim / 32;
  const std::vector<float> xsum = block_sums_of_x(x, m_dim, k_dim);
  for (int64_t r0 = 0; r0 < m_dim; r0 += kDirectMaxRows) {
    const int64_t rows = std::min(kDirectMaxRows, m_dim - r0);
    const float* xr = x + r0 * k_dim;
    const float* sr = xsum.data() + r0 * num_blocks;
    float* yr = y + r0 * n_dim;
    switch (rows) {
      case 1: direct_rows<TYPE, 1>(xr, k_dim, sr, raw, row_bytes, block_bytes, n_dim, bias, yr); break;
      case 2: direct_rows<TYPE, 2>(xr, k_dim, sr, raw, row_bytes, block_bytes, n_dim, bias, yr); break;
      case 3: direct_rows<TYPE, 3>(xr, k_dim, sr, raw, row_bytes, block_bytes, n_dim, bias, yr); break;
      default: direct_rows<TYPE, 4>(xr, k_dim, sr, raw, row_bytes, block_bytes, n_dim, bias, yr); break;
    }
  }
}

// One group of 8 output rows in the interleaved layout (see interleave_head_bytes) against MR rows
// of x: the group's 8 columns live in the 8 lanes of one accumulator per x row, so a k step is a
// broadcast of x[k] and one FMA with that k's 8 quants, and the per-block scales and offsets are
// applied as vectors (no horizontal sums). Each decoded vector of quants serves all MR rows.
//
// SPLAT: x arrives pre-broadcast, each x[r][k] as 8 copies at x + 8 * (r * k_dim + k), so a k step
// loads it (folded into the FMA) instead of broadcasting it: ~8% faster at 1 row, ~15% at 2-4
// (one thread, weight in cache), worth the copy while it stays small (kSplatMaxFloats).
template <int64_t TYPE, int MR, bool SPLAT>
void interleaved_group(const float* x, int64_t k_dim, const float* xsum, int64_t num_blocks, const uint8_t* w,
                       float* y, int64_t ldy, const float* bias) {
  auto xk = [&](int r, int64_t k) {
    return SPLAT ? _mm256_load_ps(x + 8 * (r * k_dim + k)) : _mm256_broadcast_ss(x + r * k_dim + k);
  };
  constexpr int64_t head = TYPE == kQ4_1 ? 32 : 16;  // the 8 rows' f16 scales (and Q4_1's mins)
  constexpr int64_t chunk = 8 * (TYPE == kQ8_0 ? 34 : TYPE == kQ4_1 ? 20 : 18);
  // Independent FMA chains per x row (an FMA's latency is 5 cycles on Zen 1); at 4 rows the rows'
  // chains suffice, and more would spill registers (one chain per row: ~10% faster there).
  constexpr int NA = MR == 1 ? 4 : MR == 4 ? 1 : 2;
  __m256 acc[MR];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i mask = _mm256_set1_epi32(0x0F);
  for (int64_t b = 0; b < num_blocks; ++b) {
    const uint8_t* p = w + b * chunk;
    // One stream per thread, but the hardware prefetcher alone leaves it short: fetching 1 KiB
    // ahead made Q8_0 ~25% and Q4_1 ~6% faster at 1 row, weights streamed from memory (a prefetch
    // past the end of the weight is harmless).
#pragma GCC unroll 8
    for (int64_t line = 0; line < chunk; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(p + kInterleavedPrefetchBytes + line), _MM_HINT_T0);
    const uint8_t* qs = p + head;
    const int64_t k0 = b * 32;
    __m256 dot[MR][NA];
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int a = 0; a < NA; ++a) dot[r][a] = _mm256_setzero_ps();
    if constexpr (TYPE == kQ8_0) {
#pragma GCC unroll 32
      for (int k = 0; k < 32; ++k) {  // bytes 8k..8k+7: quant k of the 8 rows
        const __m256 q = _mm256_cvtepi32_ps(
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8 * k))));
#pragma GCC unroll 4
        for (int r = 0; r < MR; ++r)
          dot[r][k % NA] = _mm256_fmadd_ps(xk(r, k0 + k), q, dot[r][k % NA]);
      }
    } else {
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) {  // bytes 8j..8j+7: packed byte j of the 8 rows (elements j, j + 16)
        const __m256i wide = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8 * j)));
        const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(wide, mask));
        const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(wide, 4));
        constexpr int kLo = 0, kHi = NA / 2;  // NA == 1: one chain for both
#pragma GCC unroll 4
        for (int r = 0; r < MR; ++r) {
          const int a = NA == 4 ? (j & 1) : 0;
          dot[r][kLo + a] = _mm256_fmadd_ps(xk(r, k0 + j), lo, dot[r][kLo + a]);
          dot[r][kHi + a] = _mm256_fmadd_ps(xk(r, k0 + j + 16), hi, dot[r][kHi + a]);
        }
      }
    }
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    __m256 m = _mm256_setzero_ps();
    if constexpr (TYPE == kQ4_1) m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
    if constexpr (TYPE == kQ4_0) m = _mm256_mul_ps(d, _mm256_set1_ps(-8.0f));  // d (q - 8) = d q - 8 d
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      __m256 s = dot[r][0];
#pragma GCC unroll 4
      for (int a = 1; a < NA; ++a) s = _mm256_add_ps(s, dot[r][a]);
      acc[r] = _mm256_fmadd_ps(d, s, acc[r]);
      if constexpr (TYPE != kQ8_0)
        acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(xsum[r * num_blocks + b]), acc[r]);
    }
  }
  const __m256 bv = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) _mm256_storeu_ps(y + r * ldy, _mm256_add_ps(acc[r], bv));
}

// The pre-broadcast copy of x (SPLAT) is used while it has at most this many floats (72 KiB: it is
// reread once per group of 8 output rows, so it must stay in L2).
constexpr int64_t kSplatMaxFloats = 18432;

template <int64_t TYPE, int MR>
void interleaved_rows(const float* x, int64_t k_dim, const float* xsum, const uint8_t* packed, int64_t row_bytes,
                      int64_t n_dim, const float* bias, float* y) {
  const int64_t num_blocks = k_dim / 32, groups = n_dim / 8;
  const int64_t splat_floats = 8 * MR * k_dim;
  if (splat_floats <= kSplatMaxFloats) {
    const std::unique_ptr<__m256[]> splat(new __m256[static_cast<size_t>(MR * k_dim)]);  // 32-byte aligned
    for (int64_t i = 0; i < MR * k_dim; ++i) splat[i] = _mm256_set1_ps(x[i]);
    const float* xs = reinterpret_cast<const float*>(splat.get());
    at::parallel_for(0, groups, 4, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g)
        interleaved_group<TYPE, MR, true>(xs, k_dim, xsum, num_blocks, packed + g * 8 * row_bytes, y + g * 8, n_dim,
                                          bias ? bias + g * 8 : nullptr);
    });
    return;
  }
  at::parallel_for(0, groups, 4, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      interleaved_group<TYPE, MR, false>(x, k_dim, xsum, num_blocks, packed + g * 8 * row_bytes, y + g * 8, n_dim,
                                         bias ? bias + g * 8 : nullptr);
  });
}

// The direct path on the interleaved layout; n_dim is the padded row count (a multiple of 8).
template <int64_t TYPE>
void interleaved_linear(const float* x, int64_t m_dim, int64_t k_dim, const uint8_t* packed, int64_t row_bytes,
                        int64_t n_dim, const float* bias, float* y) {
  const int64_t num_blocks = k_dim / 32;
  const std::vector<float> xsum = block_sums_of_x(x, m_dim, k_dim);
  for (int64_t r0 = 0; r0 < m_dim; r0 += kDirectMaxRows) {
    const int64_t rows = std::min(kDirectMaxRows, m_dim - r0);
    const float* xr = x + r0 * k_dim;
    const float* sr = xsum.data() + r0 * num_blocks;
    float* yr = y + r0 * n_dim;
    switch (rows) {
      case 1: interleaved_rows<TYPE, 1>(xr, k_dim, sr, packed, row_bytes, n_dim, bias, yr); break;
      case 2: interleaved_rows<TYPE, 2>(xr, k_dim, sr, packed, row_bytes, n_dim, bias, yr); break;
      case 3: interleaved_rows<TYPE, 3>(xr, k_dim, sr, packed, row_bytes, n_dim, bias, yr); break;
      default: interleaved_rows<TYPE, 4>(xr, k_dim, sr, packed, row_bytes, n_dim, bias, yr); break;
    }
  }
}

#endif  // QUIRE_QUANT_AVX2

// The interleaved layout back in GGUF's (each row's blocks contiguous), for builds without its kernels.
[[maybe_unused]] std::vector<uint8_t> deinterleave(const BlockFormat& format, const uint8_t* packed, int64_t n_dim, int64_t row_bytes) {
  const int64_t head = interleave_head_bytes(format.type), quant_bytes = format.bytes - head;
  const int64_t num_blocks = row_bytes / format.bytes, chunk = 8 * format.bytes;
  std::vector<uint8_t> rows(static_cast<size_t>(n_dim * row_bytes));
  for (int64_t g = 0; g < n_dim / 8; ++g)
    for (int64_t b = 0; b < num_blocks; ++b) {
      const uint8_t* src = packed + g * 8 * row_bytes + b * chunk;
      for (int64_t i = 0; i < 8; ++i) {
        uint8_t* dst = rows.data() + (g * 8 + i) * row_bytes + b * format.bytes;
        for (int64_t f = 0; f < head / 2; ++f) std::memcpy(dst + 2 * f, src + f * 16 + 2 * i, 2);
        for (int64_t j = 0; j < quant_bytes; ++j) dst[head + j] = src[8 * head + 8 * j + i];
      }
    }
  return rows;
}

// Runs the direct path where it has a kernel for this format (AVX2 builds); false otherwise.
bool direct_path(const BlockFormat& format, const float* x, int64_t m_dim, int64_t k_dim, const uint8_t* raw,
                 int64_t n_dim, const float* bias, float* y) {
#ifdef QUIRE_QUANT_AVX2
  const int64_t row_bytes = k_dim / format.elems * format.bytes;
  switch (format.type) {
    case kQ8_0: direct_linear<kQ8_0>(x, m_dim, k_dim, raw, row_bytes, format.bytes, n_dim, bias, y); return true;
    case kQ4_0: direct_linear<kQ4_0>(x, m_dim, k_dim, raw, row_bytes, format.bytes, n_dim, bias, y); return true;
    case kQ4_1: direct_linear<kQ4_1>(x, m_dim, k_dim, raw, row_bytes, format.bytes, n_dim, bias, y); return true;
    case kQ4_K: direct_linear<kQ4_K>(x, m_dim, k_dim, raw, row_bytes, format.bytes, n_dim, bias, y); return true;
    case kQ5_K: direct_linear<kQ5_K>(x, m_dim, k_dim, raw, row_bytes, format.bytes, n_dim, bias, y); return true;
    case kQ6_K: direct_linear<kQ6_K>(x, m_dim, k_dim, raw, row_bytes, format.bytes, n_dim, bias, y); return true;
    default: return false;
  }
#else
  (void)format, (void)x, (void)m_dim, (void)k_dim, (void)raw, (void)n_dim, (void)bias, (void)y;
  return false;
#endif
}

}  // namespace
}  // namespace quire_quant

torch::Tensor quant_dequantize(torch::Tensor raw, int64_t quant_type, int64_t in_features) {
  const quire_quant::BlockFormat& format = quire_quant::checked_format(quant_type);
  quire_quant::check_raw(raw, format, in_features);
  const int64_t n_dim = raw.size(0), row_bytes = raw.size(1), num_blocks = in_features / format.elems;
  torch::Tensor out = torch::empty({n_dim, in_features}, torch::TensorOptions().dtype(torch::kFloat32));
  const uint8_t* src = raw.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, n_dim, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t b = 0; b < num_blocks; ++b)
        format.decode(src + n * row_bytes + b * format.bytes, dst + n * in_features + b * format.elems, 1);
  });
  return out;
}

torch::Tensor quant_linear(torch::Tensor x, torch::Tensor raw, int64_t quant_type, int64_t in_features,
                           c10::optional<torch::Tensor> bias) {
  const bool interleaved = (quant_type & quire_quant::kInterleavedFlag) != 0;
  const bool int8_activations = (quant_type & quire_quant::kInt8ActivationsFlag) != 0;
  const quire_quant::BlockFormat& format = quire_quant::checked_format(
      quant_type & ~(quire_quant::kInterleavedFlag | quire_quant::kInt8ActivationsFlag));
  quire_quant::check_raw(raw, format, in_features);
  // The format and row count of the quad layout are checked by quant_linear_int8_activations.
  TORCH_CHECK(!(int8_activations && interleaved), "the quad layout (type id + ", quire_quant::kInt8ActivationsFlag,
              ") and the interleaved one (+ ", quire_quant::kInterleavedFlag, ") exclude each other");
  if (interleaved) {
    TORCH_CHECK(quire_quant::interleave_head_bytes(format.type) > 0, "quant_type ", format.type,
                " has no interleaved layout (Q8_0, Q4_0 and Q4_1 do)");
    TORCH_CHECK(raw.size(0) % 8 == 0, "an interleaved weight has a multiple of 8 rows, got ", raw.size(0));
  }
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous float32 [rows, in_features] CPU tensor");
  TORCH_CHECK(x.size(1) == in_features, "x has ", x.size(1), " features; the weight has in_features ", in_features);
  const int64_t n_dim = raw.size(0), m_dim = x.size(0);
  const float* bias_data = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == n_dim,
                "bias must be a contiguous float32 [out_features] tensor");
    bias_data = bias->data_ptr<float>();
  }
  torch::Tensor y = torch::empty({m_dim, n_dim}, x.options());
  if (m_dim == 0 || n_dim == 0) return y;
  const float* xd = x.data_ptr<float>();
  const uint8_t* rd = raw.data_ptr<uint8_t>();
  float* yd = y.data_ptr<float>();
  if (int8_activations)
    return quant_linear_int8_activations(xd, m_dim, in_features, rd, format.type, n_dim, raw.size(1), bias_data, y);
  if (interleaved) {
#ifdef QUIRE_QUANT_AVX2
    if (m_dim <= quire_quant::kDirectMaxRows) {
      const int64_t row_bytes = raw.size(1);
      switch (format.type) {
        case quire_quant::kQ8_0:
          quire_quant::interleaved_linear<quire_quant::kQ8_0>(xd, m_dim, in_features, rd, row_bytes, n_dim, bias_data, yd);
          break;
        case quire_quant::kQ4_0:
          quire_quant::interleaved_linear<quire_quant::kQ4_0>(xd, m_dim, in_features, rd, row_bytes, n_dim, bias_data, yd);
          break;
        default:
          quire_quant::interleaved_linear<quire_quant::kQ4_1>(xd, m_dim, in_features, rd, row_bytes, n_dim, bias_data, yd);
          break;
      }
    } else {
      quire_quant::quant_panel_linear(format, true, xd, m_dim, in_features, rd, n_dim, bias_data, yd);
    }
#else
    const std::vector<uint8_t> rows = quire_quant::deinterleave(format, rd, n_dim, raw.size(1));
    quire_quant::quant_panel_linear(format, false, xd, m_dim, in_features, rows.data(), n_dim, bias_data, yd);
#endif
    return y;
  }
  if (m_dim <= quire_quant::kDirectMaxRows &&
      quire_quant::direct_path(format, xd, m_dim, in_features, rd, n_dim, bias_data, yd))
    return y;
  quire_quant::quant_panel_linear(format, false, xd, m_dim, in_features, rd, n_dim, bias_data, yd);
  return y;
}
