// LinearOperand: one weight, panels or GGUF blocks, behind one call (see linear_operand.h).

#include "linear_operand.h"

#include "packed_gemm.h"
#include "quant_gemm.h"

LinearOperand::LinearOperand(Kind kind, torch::Tensor weight, int64_t quant_type, int64_t in_features,
                             int64_t out_features)
    : kind_(kind),
      weight_(std::move(weight)),
      quant_type_(quant_type),
      in_features_(in_features),
      out_features_(out_features) {
  TORCH_CHECK(in_features_ > 0 && out_features_ > 0, "LinearOperand: in_features and out_features must be positive");
  // Multiplying zero rows runs every check of the GEMM entry point (layout, sizes, type id)
  // without touching the weight: a bad operand fails here, when the plan is built, rather than
  // in the middle of a decode step.
  (*this)(torch::empty({0, in_features_}, torch::TensorOptions().dtype(torch::kFloat32)), c10::nullopt);
}

LinearOperand LinearOperand::panels(torch::Tensor panels, int64_t out_features) {
  TORCH_CHECK(panels.dim() == 3, "LinearOperand.panels: panels must come from pack_weight_panels");
  const int64_t in_features = panels.size(1);  // [num_panels, in_features, words]
  return LinearOperand(Kind::kPanels, std::move(panels), 0, in_features, out_features);
}

LinearOperand LinearOperand::quantized(torch::Tensor packed, int64_t quant_type, int64_t in_features,
                                       int64_t out_features) {
  TORCH_CHECK(packed.dim() == 2 && packed.size(0) >= out_features && packed.size(0) < out_features + 8,
              "LinearOperand.quantized: packed must hold out_features rows (plus at most 7 rows of padding)");
  return LinearOperand(Kind::kQuantized, std::move(packed), quant_type, in_features, out_features);
}

std::string LinearOperand::kind_name() const { return kind_ == Kind::kPanels ? "panels" : "quantized"; }

torch::Tensor LinearOperand::operator()(const torch::Tensor& x, const c10::optional<torch::Tensor>& bias) const {
  if (kind_ == Kind::kPanels) return packed_linear(x, weight_, out_features_, bias);
  const int64_t stored_rows = weight_.size(0);
  if (stored_rows == out_features_) return quant_linear(x, weight_, quant_type_, in_features_, bias);
  // Padding rows of the interleaved layout: the bias (out_features entries) gets zeros for them,
  // as QuantizedLinearWeight does, so both add it at the same point of the sums; the padding
  // columns are then dropped.
  c10::optional<torch::Tensor> padded_bias;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == out_features_, "bias must be a float32 [out_features] tensor");
    padded_bias = torch::constant_pad_nd(*bias, {0, stored_rows - out_features_});
  }
  return quant_linear(x, weight_, quant_type_, in_features_, padded_bias).narrow(1, 0, out_features_).contiguous();
}
