// CPU kernels for quire's hot path, compiled on first use by quire/kernels/cpu_ops.py: the fused
// elementwise steps of a decoder layer, and the module's bindings. Paged attention is in
// paged_attention.cpp, the linear layers' GEMMs in packed_gemm.cpp and quant_gemm.cpp, the
// whole-layer decode call in decode_layer.cpp.

#include <torch/extension.h>

#include "decode_layer.h"
#include "layer_kernels.h"
#include "packed_gemm.h"
#include "quant_gemm.h"
#include "simd_math.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

#ifdef QUIRE_AVX2
using quire_simd::exp_nonpositive;
using quire_simd::horizontal_sum;
#endif

}  // namespace

// ---------------------------------------------------------------------------------------------
// Fused elementwise steps of a decoder layer: one pass over the data instead of one per torch op,
// and no temporaries. Both are row-parallel over tokens.

namespace {

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.dim() == 2 && t.is_contiguous(),
              name, " must be a contiguous float32 [tokens, features] CPU tensor");
}

#ifdef QUIRE_AVX2
// x * sigmoid(x) = x / (1 + e^-x), with the exponential only ever taken of -|x|.
inline __m256 silu8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 negative_abs = _mm256_or_ps(x, _mm256_set1_ps(-0.0f));
  const __m256 e = exp_nonpositive(negative_abs);  // e^-|x|
  // sigmoid(x) = 1 / (1 + e^-|x|) for x >= 0 and e^-|x| / (1 + e^-|x|) below: pick the numerator
  // first, so one division serves both (the division is the costliest instruction here).
  const __m256 is_negative = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
  const __m256 numerator = _mm256_blendv_ps(one, e, is_negative);
  return _mm256_mul_ps(x, _mm256_div_ps(numerator, _mm256_add_ps(one, e)));
}
#endif

inline float silu1(float x) { return x / (1.0f + std::exp(-x)); }

}  // namespace

// residual <- x + residual; x <- rmsnorm(residual) * weight (fp32 statistics, like the reference).
void fused_add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps) {
  check_rows(x, "x");
  check_rows(residual, "residual");
  TORCH_CHECK(x.sizes() == residual.sizes(), "x and residual shapes differ");
  TORCH_CHECK(weight.scalar_type() == torch::kFloat32 && weight.is_contiguous() && weight.numel() == x.size(1),
              "weight must be a contiguous float32 [features] tensor");
  const int64_t tokens = x.size(0), dim = x.size(1);
  float* x_data = x.data_ptr<float>();
  float* r_data = residual.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const float epsilon = static_cast<float>(eps);
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      float* xr = x_data + row * dim;
      float* rr = r_data + row * dim;
      int64_t i = 0;
      float sum_sq = 0.0f;
#ifdef QUIRE_AVX2
      __m256 acc = _mm256_setzero_ps();
      for (; i + 8 <= dim; i += 8) {
        const __m256 v = _mm256_add_ps(_mm256_loadu_ps(xr + i), _mm256_loadu_ps(rr + i));
        _mm256_storeu_ps(rr + i, v);
        acc = _mm256_fmadd_ps(v, v, acc);
      }
      sum_sq = horizontal_sum(acc);
#endif
      for (; i < dim; ++i) {
        rr[i] += xr[i];
        sum_sq += rr[i] * rr[i];
      }
      const float inv = 1.0f / std::sqrt(sum_sq / static_cast<float>(dim) + epsilon);
      i = 0;
#ifdef QUIRE_AVX2
      const __m256 inv8 = _mm256_set1_ps(inv);
      for (; i + 8 <= dim; i += 8) {
        _mm256_storeu_ps(xr + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(rr + i), inv8)));
      }
#endif
      for (; i < dim; ++i) xr[i] = w[i] * (rr[i] * inv);
    }
  });
}

// [tokens, 2 * inter] (gate | up) -> silu(gate) * up, [tokens, inter].
torch::Tensor silu_and_mul(torch::Tensor gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even number of columns");
  const int64_t tokens = gate_up.size(0), inter = gate_up.size(1) / 2;
  torch::Tensor out = torch::empty({tokens, inter}, gate_up.options());
  const float* in = gate_up.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, tokens, 4, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* gate = in + row * 2 * inter;
      const float* up = gate + inter;
      float* dst = o + row * inter;
      int64_t i = 0;
#ifdef QUIRE_AVX2
      for (; i + 8 <= inter; i += 8) {
        _mm256_storeu_ps(dst + i, _mm256_mul_ps(silu8(_mm256_loadu_ps(gate + i)), _mm256_loadu_ps(up + i)));
      }
#endif
      for (; i < inter; ++i) dst[i] = silu1(gate[i]) * up[i];
    }
  });
  return out;
}

// Rotary position embedding, in place, on the first `rotated_heads` heads of each row of a fused
// [tokens, width] q|k|v projection output ("rotate half" layout: element i pairs with i + D/2).
// cos and sin are [tokens, D/2]. Same operations as the torch path (x1 cos - x2 sin,
// x2 cos + x1 sin), one pass over q and k instead of six temporaries and a concatenation.
void rotary_embedding(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t rotated_heads,
                      int64_t head_dim) {
  check_rows(qkv, "qkv");
  TORCH_CHECK(head_dim > 0 && head_dim % 2 == 0, "head_dim must be even");
  TORCH_CHECK(rotated_heads >= 0 && rotated_heads * head_dim <= qkv.size(1), "more rotated heads than columns");
  const int64_t tokens = qkv.size(0), width = qkv.size(1), half = head_dim / 2;
  for (const torch::Tensor* table : {&cos, &sin}) {
    TORCH_CHECK(table->device().is_cpu() && table->scalar_type() == torch::kFloat32 && table->is_contiguous() &&
                    table->numel() == tokens * half,
                "cos and sin must be contiguous float32 [tokens, head_dim / 2] CPU tensors");
  }
  float* data = qkv.data_ptr<float>();
  const float* cos_data = cos.data_ptr<float>();
  const float* sin_data = sin.data_ptr<float>();
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* c = cos_data + row * half;
      const float* s = sin_data + row * half;
      for (int64_t head = 0; head < rotated_heads; ++head) {
        float* x1 = data + row * width + head * head_dim;
        float* x2 = x1 + half;
        int64_t i = 0;
#ifdef QUIRE_AVX2
        for (; i + 8 <= half; i += 8) {
          const __m256 a = _mm256_loadu_ps(x1 + i), b = _mm256_loadu_ps(x2 + i);
          const __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
          _mm256_storeu_ps(x1 + i, _mm256_sub_ps(_mm256_mul_ps(a, cv), _mm256_mul_ps(b, sv)));
          _mm256_storeu_ps(x2 + i, _mm256_add_ps(_mm256_mul_ps(b, cv), _mm256_mul_ps(a, sv)));
        }
#endif
        for (; i < half; ++i) {
          const float a = x1[i], b = x2[i];
          x1[i] = a * c[i] - b * s[i];
          x2[i] = b * c[i] + a * s[i];
        }
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_add_rms_norm", &fused_add_rms_norm, "in place: residual += x; x = rmsnorm(residual) * weight");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up of a [tokens, 2 * inter] gate|up tensor");
  m.def("pack_weight_panels", &pack_weight_panels, "a [out, in] fp32 weight re-laid out for packed_linear",
        py::arg("weight"), py::arg("bf16"));
  m.def("packed_linear", &packed_linear, "x W^T (+ b) against pack_weight_panels' layout (fp32, CPU)",
        py::arg("x"), py::arg("panels"), py::arg("out_features"), py::arg("bias") = py::none());
  m.def("rotary_embedding", &rotary_embedding,
        "in place: rotary embedding of the first rotated_heads heads of a [tokens, width] q|k|v tensor");
  m.def("paged_decode_attention", &paged_decode_attention,
        "Decode attention over a paged KV cache, in place (fp32, CPU)");
  bind_decode_layer(m);
  m.def("paged_prefill_attention", &paged_prefill_attention,
        "Causal attention of prefill chunks over a paged KV cache, into out (fp32, CPU)");
  m.def("quant_dequantize", &quant_dequantize, "a GGUF block-format [out, row_bytes] weight as fp32 [out, in]",
        py::arg("raw"), py::arg("quant_type"), py::arg("in_features"));
  m.def("quant_a8_kernel", &quant_a8_kernel, "which int8-activation kernel quant_linear runs on this CPU");
  m.def("quant_linear", &quant_linear, "x W^T (+ b) for a weight kept in a GGUF block format (fp32 x, CPU)",
        py::arg("x"), py::arg("raw"), py::arg("quant_type"), py::arg("in_features"), py::arg("bias") = py::none());
}
