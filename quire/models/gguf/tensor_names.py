"""GGUF tensor names -> the Hugging Face names quire's ``checkpoint_layout`` is keyed by, and the
row order llama.cpp's converter changed on the way."""

from __future__ import annotations

import re
from types import MappingProxyType

import torch

# Per-block tensors: GGUF short name -> Hugging Face module path under ``model.layers.N``.
_BLOCK_TENSORS = MappingProxyType(
    {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
)
_GLOBAL_TENSORS = MappingProxyType(
    {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
)
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)$")
_SUFFIXES = ("weight", "bias")


def hf_tensor_name(name: str, source: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    stem, _, suffix = name.rpartition(".")
    if suffix in _SUFFIXES:
        if stem in _GLOBAL_TENSORS:
            return f"{_GLOBAL_TENSORS[stem]}.{suffix}"
        match = _BLOCK_RE.match(stem)
        if match and match.group(2) in _BLOCK_TENSORS:
            return f"model.layers.{match.group(1)}.{_BLOCK_TENSORS[match.group(2)]}.{suffix}"
    raise ValueError(
        f"{source}: tensor {name!r} has no place in quire's decoder (known: token_embd, output_norm, "
        f"output, blk.N.{{{','.join(_BLOCK_TENSORS)}}}); is general.architecture right for this file?"
    )


def permuted_heads(hf_name: str, num_heads: int, num_kv_heads: int) -> int | None:
    """How many heads' rows llama.cpp's converter interleaved in this tensor (``llama`` arch):
    the query's heads for q_proj, the key/value heads for k_proj, None for every other tensor."""
    if ".self_attn.q_proj." in hf_name:
        return num_heads
    if ".self_attn.k_proj." in hf_name:
        return num_kv_heads
    return None


def unpermute_rows(num_rows: int, num_heads: int) -> torch.Tensor:
    """Indices ``idx`` with ``hf_rows = gguf_rows[idx]`` for a permuted q/k tensor.

    Within each head of ``d`` rows the converter moved Hugging Face row ``j * d/2 + i`` (half
    ``j``, pair ``i``) to row ``2 * i + j``; this is the inverse. It only reorders whole rows, so
    it applies to quantized rows (each row's blocks are contiguous) and to biases alike."""
    if num_rows % (2 * num_heads):
        raise ValueError(f"cannot split {num_rows} rows into {num_heads} heads of rotary pairs")
    half = num_rows // num_heads // 2
    return torch.arange(num_rows).view(num_heads, half, 2).transpose(1, 2).reshape(-1)
