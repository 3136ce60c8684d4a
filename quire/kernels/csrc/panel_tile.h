// The 6 x 16 register-tiled fp32 micro-kernel shared by the dense panel GEMM (packed_gemm.cpp:
// fp32 or bf16 panels) and the quantized panel path (quant_panel.cpp: blocks decoded into an fp32
// panel first). A panel is [k][16] output columns; x rows come packed as tiles [k][rows].
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define QUIRE_PANEL_AVX2 1
#endif

namespace quire_panel {

constexpr int64_t kPanelWidth = 16;
constexpr int64_t kMaxTileRows = 6;

// Rows [tile_start[t], tile_start[t + 1]) form tile t: M split into ceil(M / 6) tiles as evenly as
// possible (32 rows -> 5,5,5,6,5,6), so no tile is left with one or two rows.
inline std::vector<int64_t> row_tiles(int64_t rows) {
  const int64_t tiles = (rows + kMaxTileRows - 1) / kMaxTileRows;
  std::vector<int64_t> start(static_cast<size_t>(tiles + 1));
  for (int64_t t = 0; t <= tiles; ++t) start[static_cast<size_t>(t)] = rows * t / tiles;
  return start;
}

#ifdef QUIRE_PANEL_AVX2
// acc (+)= a_tile[kc x MR] * panel[kc x 16], then stored to c (row stride ldc). With accumulate
// false the accumulators start from the bias (or zero); otherwise from c, for later K blocks.
template <int MR, bool BF16>
inline void tile_kernel(const float* a, const void* panel, int64_t kc, float* c, int64_t ldc, const float* bias,
                        bool accumulate) {
  __m256 acc[MR][2];
  if (accumulate) {
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      acc[r][0] = _mm256_loadu_ps(c + r * ldc);
      acc[r][1] = _mm256_loadu_ps(c + r * ldc + 8);
    }
  } else {
    const __m256 b0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
    const __m256 b1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      acc[r][0] = b0;
      acc[r][1] = b1;
    }
  }
  const __m256i high_half = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  // Walking pointers and four k steps per loop trip leave the loop nothing but loads, widening
  // and FMAs: with the index arithmetic of a plain k loop the kernel ran at ~75% of the FMA
  // peak even on data in L1, unrolled at ~90% (6-row tile, one thread, alternating runs).
  const uint32_t* words_at = static_cast<const uint32_t*>(panel);
  const float* floats_at = static_cast<const float*>(panel);
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    __m256 w0, w1;
    if constexpr (BF16) {
      const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words_at));
      w0 = _mm256_castsi256_ps(_mm256_slli_epi32(words, 16));
      w1 = _mm256_castsi256_ps(_mm256_and_si256(words, high_half));
      words_at += kPanelWidth / 2;
    } else {
      w0 = _mm256_loadu_ps(floats_at);
      w1 = _mm256_loadu_ps(floats_at + 8);
      floats_at += kPanelWidth;
    }
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 x = _mm256_broadcast_ss(a + r);
      acc[r][0] = _mm256_fmadd_ps(x, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(x, w1, acc[r][1]);
    }
    a += MR;
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(c + r * ldc, acc[r][0]);
    _mm256_storeu_ps(c + r * ldc + 8, acc[r][1]);
  }
}
#else
// Portable fallback with the same layouts and summation order per output.
template <int MR, bool BF16>
inline void tile_kernel(const float* a, const void* panel, int64_t kc, float* c, int64_t ldc, const float* bias,
                        bool accumulate) {
  float acc[MR][kPanelWidth];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < kPanelWidth; ++j) acc[r][j] = accumulate ? c[r * ldc + j] : (bias ? bias[j] : 0.0f);
  for (int64_t k = 0; k < kc; ++k) {
    float w[kPanelWidth];
    if constexpr (BF16) {
      const uint32_t* words = static_cast<const uint32_t*>(panel) + k * 8;
      for (int j = 0; j < 8; ++j) {
        const uint32_t low = words[j] << 16, high = words[j] & 0xFFFF0000u;
        std::memcpy(&w[j], &low, 4);
        std::memcpy(&w[j + 8], &high, 4);
      }
    } else {
      std::memcpy(w, static_cast<const float*>(panel) + k * kPanelWidth, sizeof(w));
    }
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < kPanelWidth; ++j) acc[r][j] += a[k * MR + r] * w[j];
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < kPanelWidth; ++j) c[r * ldc + j] = acc[r][j];
}
#endif

template <bool BF16>
inline void run_tile(int64_t rows, const float* a, const void* panel, int64_t kc, float* c, int64_t ldc, const float* bias,
              bool accumulate) {
  switch (rows) {
    case 1: tile_kernel<1, BF16>(a, panel, kc, c, ldc, bias, accumulate); break;
    case 2: tile_kernel<2, BF16>(a, panel, kc, c, ldc, bias, accumulate); break;
    case 3: tile_kernel<3, BF16>(a, panel, kc, c, ldc, bias, accumulate); break;
    case 4: tile_kernel<4, BF16>(a, panel, kc, c, ldc, bias, accumulate); break;
    case 5: tile_kernel<5, BF16>(a, panel, kc, c, ldc, bias, accumulate); break;
    default: tile_kernel<6, BF16>(a, panel, kc, c, ldc, bias, accumulate); break;
  }
}

}  // namespace quire_panel
