// The per-op kernels of a decoder layer defined in cpu_ops.cpp, for decode_layer.cpp to chain.
#pragma once

#include <torch/extension.h>

// Decode attention over a paged KV cache into out [num_seqs, num_heads, head_dim] (fp32 q and out;
// the caches fp32 or bf16, see kv_cache_element.h). In paged_attention.cpp, like the next one.
void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor block_tables, torch::Tensor seq_lens, double scale);

// Causal attention of a step's prefill chunks ([num_chunks, 3]: query_start, query_len,
// num_computed) over the paged cache, into out [tokens, num_heads, head_dim].
void paged_prefill_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                             torch::Tensor chunks, torch::Tensor block_tables, double scale);

// In place: residual += x; x = rmsnorm(residual) * weight.
void fused_add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps);

// silu(gate) * up of a [tokens, 2 * inter] gate|up tensor.
torch::Tensor silu_and_mul(torch::Tensor gate_up);

// In place: rotary embedding of the first rotated_heads heads of a [tokens, width] q|k|v tensor.
void rotary_embedding(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t rotated_heads,
                      int64_t head_dim);
