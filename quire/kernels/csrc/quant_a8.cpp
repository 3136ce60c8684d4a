// quant_linear with int8 activations (kInt8ActivationsFlag; opt-in: --quantized-activations int8):
// x is quantized per row and 32-element block to int8 with an fp32 scale (quant_a8.h), and each
// block's dot with Q8_0 / Q4_0 / Q4_1 weights is an exact integer dot, scaled once:
//   y[n] = sum_b d_w[n,b] * d_x[b] * sum_k qx[k] qw[n,k]  (+ m_w[n,b] * d_x[b] * sum_k qx[k] for Q4_1;
//          Q4_0's qw - 8 subtracts 8 * sum_k qx[k] from the integer dot).
// Llama.cpp's approach (its Q8_0/Q8_1 activations): the weights stay as stored, but x loses
// precision (~0.4% of each block's largest value), so results differ from the fp32 product with
// the dequantized weight by far more than 1e-3; hence opt-in. In exchange a 32-wide block costs
// a few integer instructions per 8 output rows instead of widening every weight to fp32.
//
// Every row count takes this path: the weight's group of 8 rows stays in L1 while 4 rows of x at
// a time pass over it, so weights stream from memory once per call.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "quant_a8.h"
#include "quant_blocks.h"
#include "quant_gemm.h"
#include "quant_simd.h"

namespace quire_quant {
namespace {

// The quantized x of one call, owning its buffers.
struct Int8Buffer {
  std::vector<int8_t> q;
  std::vector<float> d, dsum;
  std::vector<int32_t> qsum;
  Int8Rows view(int64_t k) const { return {q.data(), d.data(), qsum.data(), dsum.data(), k}; }
};

// One block of 32: the same fp32 operations as the torch reference (int8_activation_reference in
// quant_linear.py), so the int8 values match it exactly: d = amax / 127, inv = 1 / d (0 if d == 0),
// q = clamp(round_half_even(x * inv), -127, 127).
void quantize_block(const float* x, int8_t* q, float* d_out, int32_t* sum_out) {
#ifdef QUIRE_QUANT_AVX2
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4], amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float d = _mm_cvtss_f32(m4) / 127.0f;
  const __m256 inv = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  __m256i qi[4], sum = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    // cvtps rounds per MXCSR: to nearest, ties to even (torch.round's rule).
    qi[i] = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv)), lo), hi);
    sum = _mm256_add_epi32(sum, qi[i]);
  }
  // packs interleave 128-bit lanes: bytes come out as [q0 0-3, q1 0-3, q2 0-3, q3 0-3 | 4-7 ...].
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
  const __m256i ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), ordered);
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1)));
  *sum_out = _mm_cvtsi128_si32(s4);
  *d_out = d;
#else
  float amax = 0.0f;
  for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float d = amax / 127.0f;
  const float inv = d != 0.0f ? 1.0f / d : 0.0f;
  int32_t sum = 0;
  for (int i = 0; i < 32; ++i) {
    const float r = std::nearbyint(x[i] * inv);  // the default rounding mode: ties to even
    const int32_t v = static_cast<int32_t>(std::min(127.0f, std::max(-127.0f, r)));
    q[i] = static_cast<int8_t>(v);
    sum += v;
  }
  *sum_out = sum;
  *d_out = d;
#endif
}

Int8Buffer quantize_rows(const float* x, int64_t m, int64_t k) {
  const int64_t nb = k / 32;
  Int8Buffer out;
  out.q.resize(static_cast<size_t>(m * k));
  out.d.resize(static_cast<size_t>(m * nb));
  out.dsum.resize(out.d.size());
  out.qsum.resize(out.d.size());
  for (int64_t i = 0; i < m * nb; ++i) {
    quantize_block(x + 32 * i, out.q.data() + 32 * i, &out.d[i], &out.qsum[i]);
    out.dsum[i] = out.d[i] * static_cast<float>(out.qsum[i]);
  }
  return out;
}

// The portable kernel (any CPU): the same sums, one output row and block at a time.
void a8_groups_portable(const A8Problem& p, int64_t g0, int64_t g1) {
  const BlockFormat& format = *find_format(p.type);
  const int64_t head = interleave_head_bytes(p.type), k = p.x.k, nb = k / 32, chunk = 8 * format.bytes;
  for (int64_t g = g0; g < g1; ++g)
    for (int64_t c = 0; c < 8; ++c)
      for (int64_t r = 0; r < p.m; ++r) {
        float acc = 0.0f;
        for (int64_t b = 0; b < nb; ++b) {
          const uint8_t* blk = p.w + g * 8 * p.row_bytes + b * chunk;
          const uint8_t* qs = blk + 8 * head;
          const int8_t* xq = p.x.q + r * k + 32 * b;
          int32_t dot = 0;
          for (int64_t j = 0; j < format.bytes - head; ++j) {
            const uint8_t byte = qs[32 * (j / 4) + 4 * c + j % 4];  // quant byte j of row c
            if (p.type == kQ8_0) {
              dot += static_cast<int8_t>(byte) * xq[j];
            } else {
              dot += (byte & 0x0F) * xq[j] + (byte >> 4) * xq[j + 16];
            }
          }
          const int64_t xb = r * nb + b;
          if (p.type == kQ4_0) dot -= 8 * p.x.qsum[xb];
          acc += load_half(blk + 2 * c) * p.x.d[xb] * static_cast<float>(dot);
          if (p.type == kQ4_1) acc += load_half(blk + 16 + 2 * c) * p.x.dsum[xb];
        }
        p.y[r * p.ldy + 8 * g + c] = acc + (p.bias ? p.bias[8 * g + c] : 0.0f);
      }
}

using GroupKernel = void (*)(const A8Problem&, int64_t, int64_t);

// The best kernel this build and CPU run, decided once per process.
const std::pair<GroupKernel, const char*>& chosen_kernel() {
  static const std::pair<GroupKernel, const char*> kernel = []() -> std::pair<GroupKernel, const char*> {
#ifdef QUIRE_QUANT_AVX2
    if (a8_vnni_available()) {
#ifdef __AVX512VL__
      return {a8_groups_vnni, "avx512vnni"};
#else
      return {a8_groups_vnni, "avxvnni"};
#endif
    }
    return {a8_groups_avx2, "avx2"};
#else
    return {a8_groups_portable, "portable"};
#endif
  }();
  return kernel;
}

}  // namespace
}  // namespace quire_quant

std::string quant_a8_kernel() { return quire_quant::chosen_kernel().second; }

torch::Tensor quant_linear_int8_activations(const float* x, int64_t m_dim, int64_t in_features, const uint8_t* raw,
                                            int64_t quant_type, int64_t n_dim, int64_t row_bytes, const float* bias,
                                            torch::Tensor y) {
  using namespace quire_quant;
  TORCH_CHECK(quant_type == kQ8_0 || quant_type == kQ4_0 || quant_type == kQ4_1,
              "int8 activations (quant_type + ", kInt8ActivationsFlag, ") apply to Q8_0, Q4_0 and Q4_1, not type ",
              quant_type);
  TORCH_CHECK(n_dim % 8 == 0, "a weight in the quad layout has a multiple of 8 rows, got ", n_dim);
  const Int8Buffer xq = quantize_rows(x, m_dim, in_features);
  const A8Problem problem{quant_type, xq.view(in_features), m_dim, raw, row_bytes, bias, y.data_ptr<float>(), n_dim};
  const GroupKernel kernel = chosen_kernel().first;
  // Few rows: small grains so both cores share even the small projections.
  at::parallel_for(0, n_dim / 8, m_dim <= 4 ? 4 : 1,
                   [&](int64_t g0, int64_t g1) { kernel(problem, g0, g1); });
  return y;
}
