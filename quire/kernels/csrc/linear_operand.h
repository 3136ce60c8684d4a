// A linear layer's weight as the compiled decode-layer kernel multiplies by it; see linear_operand.cpp.
#pragma once

#include <torch/extension.h>

// One [out_features, in_features] weight in whichever form its linear method keeps it: the
// panel-packed fp32/bf16 layout of packed_linear, or GGUF blocks (optionally in the interleaved
// layout) for quant_linear. Callers multiply by it without knowing which: the choice of GEMM is
// made once, here, instead of at every call site. Copies share the weight tensor (no data copy).
class LinearOperand {
 public:
  // panels: pack_weight_panels' output for a weight of out_features rows.
  static LinearOperand panels(torch::Tensor panels, int64_t out_features);
  // packed: uint8 block rows as quant_linear takes them; quant_type: the GGML type id, plus
  // kInterleavedFlag for the interleaved layout (whose rows are padded to a multiple of 8, so
  // packed may have up to 7 more rows than out_features).
  static LinearOperand quantized(torch::Tensor packed, int64_t quant_type, int64_t in_features,
                                 int64_t out_features);

  // x [rows, in_features] (contiguous fp32) times the weight, transposed, plus bias:
  // a contiguous fp32 [rows, out_features].
  torch::Tensor operator()(const torch::Tensor& x, const c10::optional<torch::Tensor>& bias) const;

  int64_t out_features() const { return out_features_; }
  int64_t in_features() const { return in_features_; }
  // "panels" or "quantized": for logs and tests.
  std::string kind_name() const;

 private:
  enum class Kind { kPanels, kQuantized };
  LinearOperand(Kind kind, torch::Tensor weight, int64_t quant_type, int64_t in_features, int64_t out_features);

  Kind kind_;
  torch::Tensor weight_;
  int64_t quant_type_;  // Kind::kQuantized only
  int64_t in_features_;
  int64_t out_features_;
};
