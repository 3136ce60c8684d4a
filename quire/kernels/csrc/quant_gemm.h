// Linear layers whose weights stay in GGUF block formats (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K); see
// quant_gemm.cpp.
#pragma once

#include <torch/extension.h>

// raw: uint8 [out_features, row_bytes], GGUF's byte layout (each output row's blocks contiguous);
// quant_type: the GGML type id. Returns fp32 [out_features, in_features], bit-identical to
// gguf-py's dequantize.
torch::Tensor quant_dequantize(torch::Tensor raw, int64_t quant_type, int64_t in_features);

// x [rows, in_features] (fp32) times the dequantized weight, transposed, plus bias: fp32
// [rows, out_features]. The weight is decoded block by block inside the product, never whole.
torch::Tensor quant_linear(torch::Tensor x, torch::Tensor raw, int64_t quant_type, int64_t in_features,
                           c10::optional<torch::Tensor> bias);

// The int8-activation path of quant_linear (quant_type with quant_a8.h's kInt8ActivationsFlag),
// after quant_linear's checks: y is the [m_dim, n_dim] output to fill; returns it.
torch::Tensor quant_linear_int8_activations(const float* x, int64_t m_dim, int64_t in_features, const uint8_t* raw,
                                            int64_t quant_type, int64_t n_dim, int64_t row_bytes, const float* bias,
                                            torch::Tensor y);

// Which int8-activation kernel this build runs on this CPU: "avx512vnni", "avxvnni", "avx2" or "portable".
std::string quant_a8_kernel();
