// The panel path of quant_linear: 16 output rows at a time are decoded exactly into a small fp32
// panel [k][16] that stays in L1, and a 6 x 16 register-tiled kernel (the shape of
// packed_gemm.cpp's) runs every row tile of x over it, so each weight is decoded once per call
// however many rows x has. The result is the fp32 product with the dequantized weight (exact
// values, summed in another order than F.linear).
//
// Filling the panel costs about as much as a few rows of FMAs, so this path serves 5 rows and up;
// at 32 rows it runs at 0.85-0.95x the bf16 panel GEMM (benchmarks/quant_gemm.py).
#include "quant_panel.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "panel_tile.h"
#include "quant_simd.h"

namespace quire_quant {
namespace {

using quire_panel::kMaxTileRows;
using quire_panel::kPanelWidth;
using quire_panel::row_tiles;
// The panel holds at most this many K steps (16 KiB of fp32: it stays in L1 while every row tile
// runs over it). A multiple of 256, so every format's blocks fit whole.
constexpr int64_t kPanelTargetK = 256;

#ifdef QUIRE_QUANT_AVX2
// Elements c..c+3 of 8 rows (rows[i] + c) as 4 vectors over the rows: out[k] = element c + k of
// rows 0..7. Each input vector holds row i in its low lane and row i + 4 in its high lane, so an
// in-lane 4 x 4 transpose finishes it: no lane-crossing shuffle (vperm2f128 is 8 uops on Zen 1;
// with it the 8 x 8 transpose made the panel fill ~2x slower, measured).
inline void transpose_8x4(const float* const rows[8], int64_t c, __m256 out[4]) {
  __m256 r[4];
  for (int i = 0; i < 4; ++i)
    r[i] = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_load_ps(rows[i] + c)), _mm_load_ps(rows[i + 4] + c), 1);
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  out[0] = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  out[1] = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  out[2] = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  out[3] = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
}

// The panel's K steps [k0, k0 + kc) for output rows col0 .. col0 + cols - 1: each group of 8 rows
// is decoded a block at a time into a row-major scratch and transposed into the panel.
template <void (*Decode)(const uint8_t*, float*, int64_t)>
void fill_panel(const BlockFormat& format, const uint8_t* raw, int64_t row_bytes, int64_t cols, int64_t k0,
                int64_t kc, float* panel) {
  alignas(32) float rows[8][256];
  const float* const row_ptrs[8] = {rows[0], rows[1], rows[2], rows[3], rows[4], rows[5], rows[6], rows[7]};
  for (int64_t h = 0; h < kPanelWidth / 8; ++h) {
    const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(8, cols - 8 * h));
    if (valid < 8) std::memset(rows[valid], 0, sizeof(float) * 256 * static_cast<size_t>(8 - valid));
    for (int64_t b = 0; b < kc / format.elems; ++b) {
      const int64_t offset = (k0 / format.elems + b) * format.bytes;
      for (int64_t i = 0; i < valid; ++i) Decode(raw + (8 * h + i) * row_bytes + offset, rows[i], 1);
      for (int64_t c = 0; c < format.elems; c += 4) {
        __m256 out[4];
        transpose_8x4(row_ptrs, c, out);
        float* dst = panel + (b * format.elems + c) * kPanelWidth + 8 * h;
        for (int k = 0; k < 4; ++k) _mm256_storeu_ps(dst + k * kPanelWidth, out[k]);
      }
    }
  }
}

// 8 rows x 16 bytes -> 8 vectors, vector j holding byte 2j of rows 0..7 then byte 2j + 1 of rows
// 0..7 (three rounds of interleaving: 8-, 16-, then 32-bit).
inline void transpose_bytes_8x16(const __m128i r[8], __m128i out[8]) {
  __m128i s1[8], s2[8];
  for (int p = 0; p < 4; ++p) {
    s1[p] = _mm_unpacklo_epi8(r[2 * p], r[2 * p + 1]);      // bytes 0..7 of rows 2p, 2p+1
    s1[p + 4] = _mm_unpackhi_epi8(r[2 * p], r[2 * p + 1]);  // bytes 8..15
  }
  for (int half = 0; half < 2; ++half) {
    const __m128i* a = s1 + 4 * half;
    // rows 0-3 and rows 4-7, bytes 0..3 (lo) and 4..7 (hi) of this half
    s2[4 * half + 0] = _mm_unpacklo_epi16(a[0], a[1]);
    s2[4 * half + 1] = _mm_unpackhi_epi16(a[0], a[1]);
    s2[4 * half + 2] = _mm_unpacklo_epi16(a[2], a[3]);
    s2[4 * half + 3] = _mm_unpackhi_epi16(a[2], a[3]);
  }
  for (int half = 0; half < 2; ++half)
    for (int quarter = 0; quarter < 2; ++quarter) {
      const __m128i low_rows = s2[4 * half + quarter], high_rows = s2[4 * half + 2 + quarter];
      out[4 * half + 2 * quarter] = _mm_unpacklo_epi32(low_rows, high_rows);
      out[4 * half + 2 * quarter + 1] = _mm_unpackhi_epi32(low_rows, high_rows);
    }
}

// The panel fill for Q8_0 / Q4_0 / Q4_1 without a float transpose: the quant bytes of 8 rows are
// transposed (cheap byte shuffles), so each vector of quants is already "one k, 8 rows", and the
// rows' scales and offsets are applied as vectors. About half the instructions of decoding rows
// and transposing floats. Values are exact: each d * q is exact (see quant_blocks.h), so the FMA
// rounds once, like gguf-py's multiply then add.
// INTERLEAVED: raw is in kInterleavedFlag's layout, where the scales and the transposed quant
// bytes of each group of 8 rows are already stored that way (only whole groups exist; the panel
// is zero-filled where cols < 16).
template <int64_t TYPE, bool INTERLEAVED = false>
void fill_panel_q32(const BlockFormat& format, const uint8_t* raw, int64_t row_bytes, int64_t cols, int64_t k0,
                    int64_t kc, float* panel) {
  static const uint8_t kZeroBlock[64] = {};  // d = 0 (and m = 0): rows past the weight decode to 0
  constexpr int64_t quant_offset = TYPE == quire_quant::kQ4_1 ? 4 : 2;
  for (int64_t h = 0; h < kPanelWidth / 8; ++h) {
    const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(8, cols - 8 * h));
    if (INTERLEAVED && valid == 0) continue;
    for (int64_t b = 0; b < kc / 32; ++b) {
      const int64_t offset = (k0 / 32 + b) * format.bytes;
      const uint8_t* block[8];
      uint16_t d_bits[8], m_bits[8];
      const uint8_t* chunk = raw + 8 * h * row_bytes + 8 * offset;  // INTERLEAVED: this group's block b
      if constexpr (INTERLEAVED) {
        std::memcpy(d_bits, chunk, 16);
        if constexpr (TYPE == quire_quant::kQ4_1) std::memcpy(m_bits, chunk + 16, 16);
      } else {
        for (int i = 0; i < 8; ++i) {
          block[i] = i < valid ? raw + (8 * h + i) * row_bytes + offset : kZeroBlock;
          std::memcpy(&d_bits[i], block[i], 2);
          std::memcpy(&m_bits[i], block[i] + 2, 2);
        }
      }
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d_bits)));
      __m256 m = _mm256_setzero_ps();
      if constexpr (TYPE == quire_quant::kQ4_1)
        m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m_bits)));
      if constexpr (TYPE == quire_quant::kQ4_0) m = _mm256_mul_ps(d, _mm256_set1_ps(-8.0f));  // d (q - 8) = d q - 8 d
      float* dst = panel + b * 32 * kPanelWidth + 8 * h;
      const __m256i mask = _mm256_set1_epi32(0x0F);
      for (int part = 0; part < (TYPE == quire_quant::kQ8_0 ? 2 : 1); ++part) {
        __m128i r[8], t[8];
        if constexpr (INTERLEAVED) {
          const uint8_t* quants = chunk + 8 * quant_offset + 128 * part;
          for (int j = 0; j < 8; ++j) t[j] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(quants + 16 * j));
        } else {
          for (int i = 0; i < 8; ++i)
            r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block[i] + quant_offset + 16 * part));
          transpose_bytes_8x16(r, t);
        }
        for (int j = 0; j < 8; ++j) {
          for (int second = 0; second < 2; ++second) {
            const int64_t k = 2 * j + second + 16 * part;  // byte index within the block's quants
            const __m128i bytes = second ? _mm_unpackhi_epi64(t[j], t[j]) : t[j];
            if constexpr (TYPE == quire_quant::kQ8_0) {
              const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
              _mm256_storeu_ps(dst + k * kPanelWidth, _mm256_mul_ps(q, d));
            } else {  // byte k holds element k (low nibble) and k + 16 (high nibble)
              const __m256i wide = _mm256_cvtepu8_epi32(bytes);
              const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(wide, mask));
              const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(wide, 4));
              _mm256_storeu_ps(dst + k * kPanelWidth, _mm256_fmadd_ps(d, lo, m));
              _mm256_storeu_ps(dst + (k + 16) * kPanelWidth, _mm256_fmadd_ps(d, hi, m));
            }
          }
        }
      }
    }
  }
}

#else
// Portable: each block decoded straight into the panel's columns.
template <void (*Decode)(const uint8_t*, float*, int64_t)>
void fill_panel(const BlockFormat& format, const uint8_t* raw, int64_t row_bytes, int64_t cols, int64_t k0,
                int64_t kc, float* panel) {
  for (int64_t j = 0; j < cols; ++j) {
    const uint8_t* row = raw + j * row_bytes + k0 / format.elems * format.bytes;
    for (int64_t b = 0; b < kc / format.elems; ++b)
      Decode(row + b * format.bytes, panel + b * format.elems * kPanelWidth + j, kPanelWidth);
  }
}

#endif

using PanelFill = void (*)(const BlockFormat&, const uint8_t*, int64_t, int64_t, int64_t, int64_t, float*);

// The panel path (see the top of the file). Fill is a compile-time constant so it inlines.
template <PanelFill Fill>
void panel_linear(const BlockFormat& format, const float* x, int64_t m_dim, int64_t k_dim, const uint8_t* raw,
                  int64_t n_dim, const float* bias, float* y) {
  const std::vector<int64_t> tile_start = row_tiles(m_dim);
  const int64_t num_tiles = static_cast<int64_t>(tile_start.size()) - 1;
  // x copied into row tiles laid out [K][rows], so a tile's broadcasts read one stream.
  std::vector<float> x_tiles(static_cast<size_t>(m_dim * k_dim));
  at::parallel_for(0, num_tiles, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = tile_start[t], rows = tile_start[t + 1] - r0;
      float* dst = x_tiles.data() + r0 * k_dim;
      for (int64_t k = 0; k < k_dim; ++k)
        for (int64_t r = 0; r < rows; ++r) dst[k * rows + r] = x[(r0 + r) * k_dim + k];
    }
  });
  const int64_t row_bytes = k_dim / format.elems * format.bytes;
  static_assert(kPanelTargetK % 256 == 0, "a panel K step holds whole blocks of every format");
  const int64_t k_step = kPanelTargetK;
  const int64_t num_panels = (n_dim + kPanelWidth - 1) / kPanelWidth;

  at::parallel_for(0, num_panels, 1, [&](int64_t p0, int64_t p1) {
    // Cache-line aligned: a 16-byte aligned heap buffer made half the 32-byte loads and stores
    // split across lines, and the fill ~2x slower (measured).
    alignas(64) float panel[kPanelTargetK * kPanelWidth];
    float edge[kMaxTileRows * kPanelWidth];  // outputs of a panel that runs past n_dim
    float edge_bias[kPanelWidth];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t col0 = p * kPanelWidth;
      const int64_t cols = std::min(kPanelWidth, n_dim - col0);
      const float* panel_bias = bias ? bias + col0 : nullptr;
      if (cols < kPanelWidth) {
        std::fill(panel, panel + kPanelTargetK * kPanelWidth, 0.0f);  // columns past n_dim stay zero
        if (bias) {
          std::fill(edge_bias, edge_bias + kPanelWidth, 0.0f);
          std::copy(bias + col0, bias + col0 + cols, edge_bias);
          panel_bias = edge_bias;
        }
      }
      for (int64_t k0 = 0; k0 < k_dim; k0 += k_step) {
        const int64_t kc = std::min(k_step, k_dim - k0);
        Fill(format, raw + col0 * row_bytes, row_bytes, cols, k0, kc, panel);
        for (int64_t t = 0; t < num_tiles; ++t) {
          const int64_t r0 = tile_start[t], rows = tile_start[t + 1] - r0;
          float* c = cols == kPanelWidth ? y + r0 * n_dim + col0 : edge;
          const int64_t ldc = cols == kPanelWidth ? n_dim : kPanelWidth;
          if (cols < kPanelWidth && k0 > 0) {  // the edge buffer is shared by the tiles: reload
            for (int64_t r = 0; r < rows; ++r)
              std::copy(y + (r0 + r) * n_dim + col0, y + (r0 + r) * n_dim + col0 + cols, edge + r * kPanelWidth);
          }
          quire_panel::run_tile<false>(rows, x_tiles.data() + r0 * k_dim + k0 * rows, panel, kc, c, ldc, panel_bias,
                                       k0 > 0);
          if (cols < kPanelWidth) {
            for (int64_t r = 0; r < rows; ++r)
              std::copy(edge + r * kPanelWidth, edge + r * kPanelWidth + cols, y + (r0 + r) * n_dim + col0);
          }
        }
      }
    }
  });
}

}  // namespace

void quant_panel_linear(const BlockFormat& format, bool interleaved, const float* x, int64_t m_dim, int64_t k_dim,
                        const uint8_t* raw, int64_t n_dim, const float* bias, float* y) {
#ifdef QUIRE_QUANT_AVX2
  if (interleaved) {
    switch (format.type) {
      case kQ8_0: panel_linear<fill_panel_q32<kQ8_0, true>>(format, x, m_dim, k_dim, raw, n_dim, bias, y); return;
      case kQ4_0: panel_linear<fill_panel_q32<kQ4_0, true>>(format, x, m_dim, k_dim, raw, n_dim, bias, y); return;
      default: panel_linear<fill_panel_q32<kQ4_1, true>>(format, x, m_dim, k_dim, raw, n_dim, bias, y); return;
    }
  }
#else
  (void)interleaved;  // callers pass the GGUF layout to portable builds
#endif
  switch (format.type) {
#ifdef QUIRE_QUANT_AVX2
    case kQ8_0: panel_linear<fill_panel_q32<kQ8_0>>(format, x, m_dim, k_dim, raw, n_dim, bias, y); break;
    case kQ4_0: panel_linear<fill_panel_q32<kQ4_0>>(format, x, m_dim, k_dim, raw, n_dim, bias, y); break;
    case kQ4_1: panel_linear<fill_panel_q32<kQ4_1>>(format, x, m_dim, k_dim, raw, n_dim, bias, y); break;
#else
    case kQ8_0: panel_linear<fill_panel<decode_q8_0>>(format, x, m_dim, k_dim, raw, n_dim, bias, y); break;
    case kQ4_0: panel_linear<fill_panel<decode_q4_0>>(format, x, m_dim, k_dim, raw, n_dim, bias, y); break;
    case kQ4_1: panel_linear<fill_panel<decode_q4_1>>(format, x, m_dim, k_dim, raw, n_dim, bias, y); break;
#endif
#ifdef QUIRE_QUANT_AVX2
    case kQ4_K: panel_linear<fill_panel<decode_k_avx2<false>>>(format, x, m_dim, k_dim, raw, n_dim, bias, y); break;
    case kQ5_K: panel_linear<fill_panel<decode_k_avx2<true>>>(format, x, m_dim, k_dim, raw, n_dim, bias, y); break;
    default: panel_linear<fill_panel<decode_q6_k_avx2>>(format, x, m_dim, k_dim, raw, n_dim, bias, y); break;
#else
    case kQ4_K: panel_linear<fill_panel<decode_q4_k>>(format, x, m_dim, k_dim, raw, n_dim, bias, y); break;
    case kQ5_K: panel_linear<fill_panel<decode_q5_k>>(format, x, m_dim, k_dim, raw, n_dim, bias, y); break;
    default: panel_linear<fill_panel<decode_q6_k>>(format, x, m_dim, k_dim, raw, n_dim, bias, y); break;
#endif
  }
}

}  // namespace quire_quant
