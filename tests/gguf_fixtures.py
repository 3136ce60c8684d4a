"""Turn a tiny Hugging Face checkpoint into a GGUF file the way llama.cpp's converter does, plus
a reference checkpoint holding exactly the values the GGUF file decodes to.

The converter's steps reproduced here: architecture metadata under ``<arch>.*`` keys, tensor
names (``blk.N.attn_q.weight``, ...), the row interleaving of attn_q/attn_k for the ``llama``
architecture (its rotary kernel pairs adjacent dimensions), the chosen type for the 2-D matrices
and F32 for norms and biases. Types gguf-py cannot produce (Q4_K, Q5_K, Q6_K) get random valid
blocks instead of the checkpoint's values; the reference then holds those blocks' values.

The reference directory is the original checkpoint with its weights replaced by
``gguf.quants.dequantize`` of each stored tensor (interleaving undone), in fp32, so transformers
run on it computes what a correct GGUF loader must compute.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file, save_file

Q = gguf.GGMLQuantizationType
# Hugging Face model_type -> GGUF general.architecture (Mistral is converted as llama).
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_BLOCK_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# Byte offsets of the f16 super-block scales: (d, dmin) for Q4_K/Q5_K, d for Q6_K.
_K_SCALE_OFFSETS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def gguf_name(hf_name: str) -> str:
    stem, _, suffix = hf_name.rpartition(".")
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    assert parts[:2] == ["model", "layers"], hf_name
    return f"blk.{parts[2]}.{_BLOCK_NAMES['.'.join(parts[3:])]}.{suffix}"


def converter_permute(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's q/k permutation: within each head, halves [a | b] become pairs (a0 b0 a1 b1 ...)."""
    return (
        rows.reshape(num_heads, 2, rows.shape[0] // num_heads // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def converter_unpermute(rows: np.ndarray, num_heads: int) -> np.ndarray:
    return (
        rows.reshape(num_heads, rows.shape[0] // num_heads // 2, 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def random_k_blocks(rows: int, cols: int, qtype: Q, std: float, rng: np.random.Generator) -> np.ndarray:
    """Valid random ``qtype`` blocks ``[rows, row_bytes]`` whose values have about mean 0 and ``std``.

    Dequantizing is linear in the f16 scales (d, and dmin for Q4_K/Q5_K), so the random payload is
    decoded once per scale to choose them: dmin cancels each block's mean, d sets the spread."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    assert cols % block_elems == 0, f"{qtype.name} needs in_features divisible by {block_elems}"
    blocks = rng.integers(0, 256, size=(rows * cols // block_elems, block_bytes), dtype=np.uint8)
    offsets = _K_SCALE_OFFSETS[qtype]

    def decode(*scales: np.ndarray) -> np.ndarray:
        for offset, scale in zip(offsets, scales, strict=True):
            blocks[:, offset : offset + 2] = scale.astype(np.float16).reshape(-1, 1).view(np.uint8)
        return gguf.quants.dequantize(blocks, qtype)

    ones, zeros = np.ones(len(blocks)), np.zeros(len(blocks))
    if len(offsets) == 2:
        scaled = decode(ones, zeros).mean(axis=1)
        minus = -decode(zeros, ones).mean(axis=1)
        ratio = np.where(minus > 0, scaled / np.maximum(minus, 1e-6), 0.0)
        spread = decode(ones, ratio).std()
        decode(ones * std / spread, ratio * std / spread)
    else:
        decode(ones * std / decode(ones).std())
    return blocks.reshape(rows, -1)


def encode(values: np.ndarray, qtype: Q, rng: np.random.Generator, std: float) -> np.ndarray:
    """``values`` stored as ``qtype`` (random blocks of the same spread for the K types)."""
    if qtype == Q.F32:
        return values.astype(np.float32)
    if qtype == Q.F16:
        return values.astype(np.float16)
    if qtype in _K_SCALE_OFFSETS:
        return random_k_blocks(values.shape[0], values.shape[1], qtype, std, rng)
    return gguf.quants.quantize(values.astype(np.float32), qtype)


def write_gguf_checkpoint(
    hf_dir: Path,
    out_dir: Path,
    weight_type: str,
    *,
    embed_type: str | None = None,
    type_overrides: Mapping[str, str] | None = None,
    arch_override: str | None = None,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write ``out_dir/model.gguf`` and the reference checkpoint ``out_dir/reference``.

    ``weight_type`` is the type of every 2-D matrix, ``embed_type`` (default: the same) of
    token_embd; ``type_overrides`` maps GGUF short names (``"attn_v"``) to another type, like
    llama.cpp's mixed ``_M`` quantizations. Returns (gguf path, reference directory)."""
    config = json.loads((hf_dir / "config.json").read_text())
    arch = arch_override or GGUF_ARCH[config["model_type"]]
    permute = arch == "llama"
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    overrides = dict(type_overrides or {})
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.gguf"
    writer = gguf.GGUFWriter(path, arch)
    _add_metadata(writer, config, arch)
    if not _add_tokenizer(writer, hf_dir):
        writer.add_bos_token_id(config["bos_token_id"])
        writer.add_eos_token_id(config["eos_token_id"])

    reference: dict[str, torch.Tensor] = {}
    for hf_name, tensor in sorted(load_file(hf_dir / "model.safetensors").items()):
        name = gguf_name(hf_name)
        values = tensor.float().numpy()
        short = name.split(".")[-2]
        num_heads = {"attn_q": heads, "attn_k": kv_heads}.get(short) if permute else None
        if num_heads is not None:
            values = converter_permute(values, num_heads)
        qtype = Q.F32
        if values.ndim == 2:
            default = embed_type if short == "token_embd" and embed_type else weight_type
            qtype = Q[overrides.get(short, default)]
        stored = encode(values, qtype, rng, std=float(values.std()))
        raw_dtype = None if qtype in (Q.F32, Q.F16) else qtype
        writer.add_tensor(name, stored, raw_dtype=raw_dtype)
        decoded = gguf.quants.dequantize(stored, qtype).astype(np.float32).reshape(values.shape)
        if num_heads is not None:
            decoded = converter_unpermute(decoded, num_heads)
        reference[hf_name] = torch.from_numpy(np.ascontiguousarray(decoded))
    rope_factors = llama3_rope_factors(config)
    if rope_factors is not None:
        writer.add_tensor("rope_freqs.weight", rope_factors)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, _write_reference(hf_dir, out_dir / "reference", reference)


def _add_metadata(writer: gguf.GGUFWriter, config: dict, arch: str) -> None:
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_rope_freq_base(_rope(config).get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    scaling = _rope(config)
    if scaling.get("type", scaling.get("rope_type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])


def _rope(config: dict) -> dict:
    """RoPE settings in either transformers spelling (``rope_scaling`` or v5 ``rope_parameters``)."""
    return config.get("rope_parameters") or config.get("rope_scaling") or {}


def llama3_rope_factors(config: dict) -> np.ndarray | None:
    """What llama.cpp's converter stores as ``rope_freqs.weight`` for Llama 3.1-style scaling:
    per rotary frequency, the divisor that turns the plain frequency into the scaled one."""
    scaling = _rope(config)
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        return None
    theta = scaling.get("rope_theta", config.get("rope_theta", 10000.0))
    dim = config["head_dim"]
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * theta ** (i / dim)
        if wavelen < original / high:
            factors.append(1.0)
        elif wavelen > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _add_tokenizer(writer: gguf.GGUFWriter, hf_dir: Path) -> bool:
    """The tokenizer (and its special-token ids) as llama.cpp stores it, where the tokenizer
    fixture is available; False (nothing written) otherwise."""
    try:
        from gguf_tokenizer_fixtures import add_tokenizer_metadata
    except ImportError:
        return False
    add_tokenizer_metadata(writer, hf_dir)
    return True


def _write_reference(hf_dir: Path, out: Path, weights: dict[str, torch.Tensor]) -> Path:
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(hf_dir, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    config = json.loads((out / "config.json").read_text())
    config["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out
