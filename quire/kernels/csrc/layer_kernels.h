// The per-op kernels of a decoder layer defined in cpu_ops.cpp, for decode_layer.cpp to chain.
#pragma once

#include <torch/extension.h>

// Decode attention over a paged KV cache into out [num_seqs, num_heads, head_dim] (fp32, CPU).
void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor block_tables, torch::Tensor seq_lens, double scale);

// In place: residual += x; x = rmsnorm(residual) * weight.
void fused_add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps);

// silu(gate) * up of a [tokens, 2 * inter] gate|up tensor.
torch::Tensor silu_and_mul(torch::Tensor gate_up);

// In place: rotary embedding of the first rotated_heads heads of a [tokens, width] q|k|v tensor.
void rotary_embedding(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t rotated_heads,
                      int64_t head_dim);
