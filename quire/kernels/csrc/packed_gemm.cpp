// packed_linear: y = x W^T (+ b) for fp32 x against a weight re-laid out once at load into column
// panels, computed in fp32 by an AVX2 register-tiled kernel.
//
// Why not oneDNN here: at the 16-64 rows of a batched decode step, oneDNN's fp32 GEMM measured
// 55-95 GFLOP/s on this project's 2-core AVX2 machines (peak ~157), and the weights of a whole
// model do not fit in cache, so every step streams them from memory. This kernel keeps a 6 x 16
// tile of outputs in 12 registers, reads each weight panel once per step, and can read the weight
// in bf16 (half the bytes) when every value is exactly a bf16 number: widening bf16 to fp32 is
// exact, so the products and sums are the same fp32 arithmetic as with the fp32 weight.
//
// Layouts:
// - fp32 panels: [num_panels, K, 16] floats; panel p holds output columns 16p .. 16p+15, one row
//   of 16 per k. Columns past out_features are zero.
// - bf16 panels: [num_panels, K, 8] 32-bit words; word j of row k holds column j in its low half
//   and column j + 8 in its high half, so two integer ops widen 16 values (shift left by 16 for
//   the low halves, mask for the high halves).
// x is first copied into row tiles of up to 6 rows laid out [K][rows], so the kernel's broadcasts
// read one sequential stream instead of six strided ones.

#include "packed_gemm.h"

#include "panel_tile.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using quire_panel::kMaxTileRows;
using quire_panel::kPanelWidth;
using quire_panel::row_tiles;
using quire_panel::run_tile;

// One kernel call covers at most about this many K steps; between calls the output tile is stored
// and reloaded. Each row tile runs all its K blocks in turn (tile outer, block inner), so the
// blocks bound a call's length rather than keep a panel block in L1 across tiles: a block-outer
// order measured within +-2%. Measured on smollm2-135m shapes (K = 576 and 1536, 30 layers,
// alternating runs, medians of 9): up to 64 rows, 768 was 2-6% faster than 192 (fewer reloads of
// the output tile); for more rows 384-768 are within noise of each other, so 384 stays.
int64_t target_k_block(int64_t m_dim) { return m_dim <= 64 ? 768 : 384; }
// Up to this many row tiles (48 rows) of x per pass over the panels: their packed rows stay in L2.
constexpr int64_t kTilesPerPass = 8;

int64_t words_per_panel_row(bool bf16) { return bf16 ? kPanelWidth / 2 : kPanelWidth; }

// Threads split the weight panels, so each panel is read from memory by one thread, once per pass
// of up to kTilesPerPass row tiles (once per step for a decode batch of up to 48 rows).
template <bool BF16>
void panel_gemm(const float* x, int64_t m_dim, int64_t k_dim, const void* panels, int64_t num_panels,
                int64_t n_dim, const float* bias, float* y) {
  const std::vector<int64_t> tile_start = row_tiles(m_dim);
  const int64_t num_tiles = static_cast<int64_t>(tile_start.size()) - 1;

  std::vector<float> x_tiles(static_cast<size_t>(m_dim * k_dim));
  auto pack_tiles = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = tile_start[t], rows = tile_start[t + 1] - r0;
      float* dst = x_tiles.data() + r0 * k_dim;
      for (int64_t k = 0; k < k_dim; ++k)
        for (int64_t r = 0; r < rows; ++r) dst[k * rows + r] = x[(r0 + r) * k_dim + k];
    }
  };
  // A parallel region costs more than copying a decode step's few KiB.
  if (m_dim * k_dim >= (1 << 16)) {
    at::parallel_for(0, num_tiles, 1, pack_tiles);
  } else {
    pack_tiles(0, num_tiles);
  }

  const int64_t target = target_k_block(m_dim);
  const int64_t num_k_blocks = std::max<int64_t>(1, (k_dim + target - 1) / target);
  const int64_t k_block = (k_dim + num_k_blocks - 1) / num_k_blocks;
  const int64_t row_words = words_per_panel_row(BF16);

  at::parallel_for(0, num_panels, 1, [&](int64_t p0, int64_t p1) {
    float edge[kMaxTileRows * kPanelWidth];  // outputs of a panel that runs past n_dim
    float edge_bias[kPanelWidth];
    for (int64_t tb = 0; tb < num_tiles; tb += kTilesPerPass) {
      const int64_t te = std::min(num_tiles, tb + kTilesPerPass);
      for (int64_t p = p0; p < p1; ++p) {
        const uint32_t* panel = static_cast<const uint32_t*>(panels) + p * k_dim * row_words;
        const int64_t col0 = p * kPanelWidth;
        const int64_t cols = std::min(kPanelWidth, n_dim - col0);
        const float* panel_bias = bias ? bias + col0 : nullptr;
        if (bias && cols < kPanelWidth) {
          std::fill(edge_bias, edge_bias + kPanelWidth, 0.0f);
          std::copy(bias + col0, bias + col0 + cols, edge_bias);
          panel_bias = edge_bias;
        }
        for (int64_t t = tb; t < te; ++t) {
          const int64_t row = tile_start[t], rows = tile_start[t + 1] - row;
          const float* a = x_tiles.data() + row * k_dim;
          float* c = cols == kPanelWidth ? y + row * n_dim + col0 : edge;
          const int64_t ldc = cols == kPanelWidth ? n_dim : kPanelWidth;
          for (int64_t k0 = 0; k0 < k_dim; k0 += k_block) {
            const int64_t kc = std::min(k_block, k_dim - k0);
            run_tile<BF16>(rows, a + k0 * rows, panel + k0 * row_words, kc, c, ldc, panel_bias, k0 > 0);
          }
          if (cols < kPanelWidth) {
            for (int64_t r = 0; r < rows; ++r)
              std::copy(edge + r * kPanelWidth, edge + r * kPanelWidth + cols, y + (row + r) * n_dim + col0);
          }
        }
      }
    }
  });
}

}  // namespace

torch::Tensor pack_weight_panels(torch::Tensor weight, bool bf16) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == torch::kFloat32 && weight.dim() == 2,
              "weight must be a float32 [out_features, in_features] CPU tensor");
  const torch::Tensor w = weight.contiguous();
  const int64_t n_dim = w.size(0), k_dim = w.size(1);
  const int64_t num_panels = (n_dim + kPanelWidth - 1) / kPanelWidth;
  const float* src = w.data_ptr<float>();
  // Value of column n at step k, zero past the last column.
  auto bits = [&](int64_t n, int64_t k) -> uint32_t {
    uint32_t b = 0;
    if (n < n_dim) std::memcpy(&b, src + n * k_dim + k, 4);
    return b;
  };
  if (!bf16) {
    torch::Tensor out = torch::empty({num_panels, k_dim, kPanelWidth}, w.options());
    uint32_t* dst = reinterpret_cast<uint32_t*>(out.data_ptr<float>());
    at::parallel_for(0, num_panels, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        for (int64_t k = 0; k < k_dim; ++k)
          for (int64_t j = 0; j < kPanelWidth; ++j) dst[(p * k_dim + k) * kPanelWidth + j] = bits(p * kPanelWidth + j, k);
    });
    return out;
  }
  torch::Tensor out = torch::empty({num_panels, k_dim, kPanelWidth / 2}, w.options().dtype(torch::kInt32));
  uint32_t* dst = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  bool exact = true;
  for (int64_t i = 0; i < n_dim * k_dim && exact; ++i) {
    uint32_t b;
    std::memcpy(&b, src + i, 4);
    exact = (b & 0xFFFFu) == 0;
  }
  TORCH_CHECK(exact, "pack_weight_panels: bf16 panels need every weight value to be exactly a bf16 number");
  at::parallel_for(0, num_panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t k = 0; k < k_dim; ++k)
        for (int64_t j = 0; j < kPanelWidth / 2; ++j) {
          const int64_t n = p * kPanelWidth + j;
          dst[(p * k_dim + k) * 8 + j] = (bits(n + 8, k) & 0xFFFF0000u) | (bits(n, k) >> 16);
        }
  });
  return out;
}

torch::Tensor packed_linear(torch::Tensor x, torch::Tensor panels, int64_t out_features,
                            c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous float32 [rows, in_features] CPU tensor");
  const bool bf16 = panels.scalar_type() == torch::kInt32;
  TORCH_CHECK(panels.dim() == 3 && panels.is_contiguous() &&
                  (bf16 || panels.scalar_type() == torch::kFloat32) &&
                  panels.size(2) == words_per_panel_row(bf16),
              "panels must come from pack_weight_panels");
  TORCH_CHECK(panels.size(1) == x.size(1), "in_features of x and the packed weight differ");
  const int64_t num_panels = panels.size(0);
  TORCH_CHECK(out_features > (num_panels - 1) * kPanelWidth && out_features <= num_panels * kPanelWidth,
              "out_features does not match the packed weight");
  const float* bias_data = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == out_features,
                "bias must be a contiguous float32 [out_features] tensor");
    bias_data = bias->data_ptr<float>();
  }
  const int64_t m_dim = x.size(0), k_dim = x.size(1);
  torch::Tensor y = torch::empty({m_dim, out_features}, x.options());
  if (m_dim == 0) return y;
  if (bf16) {
    panel_gemm<true>(x.data_ptr<float>(), m_dim, k_dim, panels.data_ptr(), num_panels, out_features, bias_data,
                     y.data_ptr<float>());
  } else {
    panel_gemm<false>(x.data_ptr<float>(), m_dim, k_dim, panels.data_ptr(), num_panels, out_features, bias_data,
                      y.data_ptr<float>());
  }
  return y;
}
