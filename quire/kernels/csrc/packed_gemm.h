// Panel-packed fp32 GEMM for linear layers on CPU; see packed_gemm.cpp.
#pragma once

#include <torch/extension.h>

// The weight [out_features, in_features] re-laid out for packed_linear: fp32 panels, or bf16
// panels (half the bytes) when bf16 is true, which requires every value to be exactly a bf16.
torch::Tensor pack_weight_panels(torch::Tensor weight, bool bf16);

// x [rows, in_features] times the packed weight, transposed, plus bias: [rows, out_features].
torch::Tensor packed_linear(torch::Tensor x, torch::Tensor panels, int64_t out_features,
                            c10::optional<torch::Tensor> bias);
