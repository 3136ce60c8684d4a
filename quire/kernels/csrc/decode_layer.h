// One decoder layer of a decode-only step in a single compiled call; see decode_layer.cpp.
#pragma once

#include <torch/extension.h>

#include "linear_operand.h"

// A layer's weights and constants, built once per model (LlamaForCausalLM.prepare_for_inference)
// and validated then, so the per-step call only checks what changes per step.
struct DecodeLayerWeights {
  torch::Tensor input_norm, post_norm;  // fp32 [hidden]
  LinearOperand qkv, o, gate_up, down;
  c10::optional<torch::Tensor> qkv_bias;  // fp32 [qkv.out_features] (Qwen2), else none
  int64_t num_heads;
  double eps, scale;

  // linears: {qkv, o, gate_up, down}.
  DecodeLayerWeights(torch::Tensor input_norm, torch::Tensor post_norm, const std::vector<LinearOperand>& linears,
                     c10::optional<torch::Tensor> qkv_bias, int64_t num_heads, double eps, double scale);
};

// The MLP output of the layer for x [tokens, hidden]; residual is updated in place, as
// fused_add_rms_norm does. This step's keys and values are written to their cache slots.
torch::Tensor decode_layer(const DecodeLayerWeights& weights, torch::Tensor x, torch::Tensor residual,
                           torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor slot_mapping, torch::Tensor block_tables, torch::Tensor seq_lens);

// Registers LinearOperand, DecodeLayerWeights and decode_layer with the extension module.
void bind_decode_layer(pybind11::module& m);
