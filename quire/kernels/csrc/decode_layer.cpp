// decode_layer: one decoder layer of a decode-only step in a single call from Python, chaining the
// kernels of cpu_ops.cpp in the order of DecoderLayer.forward's CPU path (add+norm, qkv GEMM,
// rotary, cache write, decode attention, o GEMM, add+norm, gate|up GEMM, SiLU*up, down GEMM). At
// decode sizes a layer's arithmetic takes ~2-3 ms, and the ~25 Python-level calls between those
// kernels cost a sizeable fraction of that; here they are plain C++ calls.
//
// Each of the four products goes through a LinearOperand, so dense panel weights and weights kept
// in GGUF blocks (int8/int4, Q8_0/Q4_0/Q4_1/K-quants) take this same path.

#include "decode_layer.h"

#include "kv_cache_element.h"
#include "layer_kernels.h"

#include <algorithm>
#include <vector>

namespace {

void check_vector(const torch::Tensor& t, int64_t size, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.dim() == 1 &&
                  t.numel() == size,
              "DecodeLayerWeights: ", name, " must be a contiguous float32 [", size, "] CPU tensor");
}

const LinearOperand& linear_at(const std::vector<LinearOperand>& linears, size_t i) {
  TORCH_CHECK(linears.size() == 4, "DecodeLayerWeights: linears must be {qkv, o, gate_up, down}, got ",
              linears.size());
  return linears[i];
}

}  // namespace

DecodeLayerWeights::DecodeLayerWeights(torch::Tensor input_norm_, torch::Tensor post_norm_,
                                       const std::vector<LinearOperand>& linears,
                                       c10::optional<torch::Tensor> qkv_bias_, int64_t num_heads_, double eps_,
                                       double scale_)
    : input_norm(std::move(input_norm_)),
      post_norm(std::move(post_norm_)),
      qkv(linear_at(linears, 0)),
      o(linear_at(linears, 1)),
      gate_up(linear_at(linears, 2)),
      down(linear_at(linears, 3)),
      qkv_bias(std::move(qkv_bias_)),
      num_heads(num_heads_),
      eps(eps_),
      scale(scale_) {
  const int64_t hidden = input_norm.numel();
  check_vector(input_norm, hidden, "input_norm");
  check_vector(post_norm, hidden, "post_norm");
  TORCH_CHECK(num_heads > 0 && eps > 0 && scale > 0, "DecodeLayerWeights: num_heads, eps and scale must be positive");
  const int64_t q_width = o.in_features();
  TORCH_CHECK(q_width % num_heads == 0, "DecodeLayerWeights: o's in_features (", q_width,
              ") is not a multiple of num_heads (", num_heads, ")");
  TORCH_CHECK(qkv.in_features() == hidden && gate_up.in_features() == hidden,
              "DecodeLayerWeights: qkv and gate_up must take the hidden size (", hidden, ") as in_features");
  TORCH_CHECK(qkv.out_features() > q_width && (qkv.out_features() - q_width) % 2 == 0,
              "DecodeLayerWeights: qkv's out_features must be q width + 2 * kv width");
  TORCH_CHECK(o.out_features() == hidden && down.out_features() == hidden,
              "DecodeLayerWeights: o and down must produce the hidden size (", hidden, ")");
  TORCH_CHECK(gate_up.out_features() == 2 * down.in_features(),
              "DecodeLayerWeights: gate_up's out_features must be twice down's in_features");
  if (qkv_bias.has_value()) check_vector(*qkv_bias, qkv.out_features(), "qkv_bias");
}

torch::Tensor decode_layer(const DecodeLayerWeights& w, torch::Tensor x, torch::Tensor residual, torch::Tensor cos,
                           torch::Tensor sin, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slot_mapping,
                           torch::Tensor block_tables, torch::Tensor seq_lens) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type(),
              "caches must be contiguous [num_blocks, block_size, num_kv_heads, head_dim] tensors of one dtype");
  const int64_t tokens = x.size(0);
  const int64_t num_kv_heads = k_cache.size(2), head_dim = k_cache.size(3);
  const int64_t q_width = w.num_heads * head_dim, kv_width = num_kv_heads * head_dim;
  const int64_t row_width = q_width + 2 * kv_width;
  TORCH_CHECK(q_width == w.o.in_features() && row_width == w.qkv.out_features(),
              "the caches' heads do not match the layer's q|k|v projection");
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == tokens,
              "slot_mapping must be a contiguous int64 [tokens] tensor");

  fused_add_rms_norm(x, residual, w.input_norm, w.eps);
  torch::Tensor qkv = w.qkv(x, w.qkv_bias);
  rotary_embedding(qkv, cos, sin, w.num_heads + num_kv_heads, head_dim);
  // This step's keys and values into their cache slots (rounded to bf16 in a bf16 cache).
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const float* qkv_data = qkv.data_ptr<float>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "slot out of range of the cache");
  }
  quire_kv::with_cache_element(k_cache, [&](auto element) {
    using T = decltype(element);
    T* k_data = static_cast<T*>(k_cache.data_ptr());
    T* v_data = static_cast<T*>(v_cache.data_ptr());
    for (int64_t t = 0; t < tokens; ++t) {
      const float* row = qkv_data + t * row_width;
      quire_kv::store_row(row + q_width, kv_width, k_data + slots[t] * kv_width);
      quire_kv::store_row(row + q_width + kv_width, kv_width, v_data + slots[t] * kv_width);
    }
  });
  torch::Tensor q = qkv.narrow(1, 0, q_width).contiguous().view({tokens, w.num_heads, head_dim});
  torch::Tensor attention = torch::empty_like(q);
  paged_decode_attention(attention, q, k_cache, v_cache, block_tables, seq_lens, w.scale);
  torch::Tensor h = w.o(attention.view({tokens, q_width}), c10::nullopt);
  fused_add_rms_norm(h, residual, w.post_norm, w.eps);
  torch::Tensor gate_up = w.gate_up(h, c10::nullopt);
  return w.down(silu_and_mul(gate_up), c10::nullopt);
}

void bind_decode_layer(pybind11::module& m) {
  namespace py = pybind11;
  // module_local: every instruction-set tier is its own extension module with these same C++
  // types, and several tiers load into one process (tests compare them); pybind11 registers
  // classes process-wide by default, so the second tier's import would fail.
  py::class_<LinearOperand>(m, "LinearOperand",
                            "a linear layer's weight for decode_layer: panels or GGUF blocks, checked when built",
                            py::module_local())
      .def_static("panels", &LinearOperand::panels, "pack_weight_panels' layout", py::arg("panels"),
                  py::arg("out_features"))
      .def_static("quantized", &LinearOperand::quantized, "GGUF blocks as quant_linear takes them",
                  py::arg("packed"), py::arg("quant_type"), py::arg("in_features"), py::arg("out_features"))
      .def("__call__", &LinearOperand::operator(), "x W^T (+ b)", py::arg("x"), py::arg("bias") = py::none())
      .def_property_readonly("kind", &LinearOperand::kind_name)
      .def_property_readonly("out_features", &LinearOperand::out_features)
      .def_property_readonly("in_features", &LinearOperand::in_features);
  py::class_<DecodeLayerWeights>(m, "DecodeLayerWeights", "one layer's weights and constants for decode_layer",
                                 py::module_local())
      .def(py::init<torch::Tensor, torch::Tensor, const std::vector<LinearOperand>&, c10::optional<torch::Tensor>,
                    int64_t, double, double>(),
           py::arg("input_norm"), py::arg("post_norm"), py::arg("linears"), py::arg("qkv_bias"),
           py::arg("num_heads"), py::arg("eps"), py::arg("scale"))
      .def_property_readonly("linears", [](const DecodeLayerWeights& w) {
        return std::vector<LinearOperand>{w.qkv, w.o, w.gate_up, w.down};
      });
  m.def("decode_layer", &decode_layer, "one decoder layer of a decode-only step (fp32, CPU)", py::arg("weights"),
        py::arg("x"), py::arg("residual"), py::arg("cos"), py::arg("sin"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("slot_mapping"), py::arg("block_tables"), py::arg("seq_lens"));
}
