"""GGUF metadata -> ``ModelArchConfig``, per llama.cpp's key names (``<arch>.block_count``, ...).

A GGUF file names its architecture in ``general.architecture``; each supported one maps onto a
Hugging Face architecture that quire's decoder already implements. Projection biases are not
recorded in the metadata: they are read off which tensors the file holds, as llama.cpp does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from quire.gguf_file import GGUFArray, GGUFFile, GGUFTensor, open_gguf
from quire.models.hf_config import ModelArchConfig, RopeScaling

_DEFAULT_ROPE_THETA = 10000.0
_DEFAULT_RMS_NORM_EPS = 1e-6


class GGUFMetadata:
    """Typed reads of a file's key/value fields with errors that name the key and the file."""

    def __init__(self, file: GGUFFile) -> None:
        self._fields = file.fields
        self.source = file.source

    def get(self, key: str) -> Any:
        """The field's value (a Python scalar or string; ``GGUFArray`` for arrays), None if absent."""
        return self._fields.get(key)

    def has(self, key: str) -> bool:
        return key in self._fields

    def array_length(self, key: str) -> int | None:
        value = self._fields.get(key)
        return value.length if isinstance(value, GGUFArray) else None

    def string(self, key: str) -> str:
        value = self.get(key)
        if not isinstance(value, str) or not value:
            raise ValueError(f"{self.source}: metadata {key!r} must be a non-empty string, got {value!r}")
        return value

    def positive_int(self, key: str, default: int | None = None) -> int:
        value = self._number(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{self.source}: metadata {key!r} must be a positive integer, got {value!r}")
        return value

    def positive_float(self, key: str, default: float | None = None) -> float:
        value = self._number(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"{self.source}: metadata {key!r} must be a positive number, got {value!r}")
        return float(value)

    def token_id(self, key: str) -> int | None:
        value = self.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{self.source}: metadata {key!r} must be a token id, got {value!r}")
        return value

    def _number(self, key: str, default: float | None) -> Any:
        value = self.get(key)
        if value is not None:
            return value
        if default is None:
            raise ValueError(f"{self.source} is missing the required metadata field {key!r}")
        return default


@dataclass(frozen=True)
class GGUFArch:
    """How one GGUF architecture maps onto quire's decoder."""

    hf_architecture: str
    # llama.cpp's converter interleaves the rows of each attention head of attn_q/attn_k for the
    # ``llama`` architecture (its rotary kernel pairs adjacent dimensions); quire rotates halves.
    permuted_qk: bool
    qk_norm: bool
    default_context_length: int


GGUF_ARCHS: MappingProxyType[str, GGUFArch] = MappingProxyType(
    {
        # Llama, Mistral (converted as llama) and SmolLM all arrive as "llama".
        "llama": GGUFArch("LlamaForCausalLM", permuted_qk=True, qk_norm=False, default_context_length=2048),
        "qwen2": GGUFArch("Qwen2ForCausalLM", permuted_qk=False, qk_norm=False, default_context_length=32768),
        "qwen3": GGUFArch("Qwen3ForCausalLM", permuted_qk=False, qk_norm=True, default_context_length=32768),
    }
)


def gguf_arch(name: str, source: str) -> GGUFArch:
    arch = GGUF_ARCHS.get(name)
    if arch is None:
        raise ValueError(
            f"{source}: general.architecture {name!r} is not supported; quire loads GGUF architectures: "
            f"{', '.join(GGUF_ARCHS)}"
        )
    return arch


def read_gguf_arch_config(path: str | Path) -> ModelArchConfig:
    """Read the architecture config of the GGUF file at ``path``."""
    return arch_config_from_file(open_gguf(path))


def arch_config_from_file(file: GGUFFile) -> ModelArchConfig:
    source = file.source
    meta = GGUFMetadata(file)
    arch_name = meta.string("general.architecture")
    arch = gguf_arch(arch_name, source)
    tensors = {tensor.name: tensor for tensor in file.tensors}

    def key(name: str) -> str:
        return f"{arch_name}.{name}"

    hidden = meta.positive_int(key("embedding_length"))
    heads = meta.positive_int(key("attention.head_count"))
    kv_heads = meta.positive_int(key("attention.head_count_kv"), default=heads)
    if heads % kv_heads:
        raise ValueError(
            f"{source}: {key('attention.head_count')} ({heads}) must be a multiple of "
            f"{key('attention.head_count_kv')} ({kv_heads})"
        )
    head_dim = meta.positive_int(key("attention.key_length"), default=hidden // heads)
    _check_same(meta, key("attention.value_length"), head_dim, "the key length (head_dim)")
    _check_same(meta, key("rope.dimension_count"), head_dim, "head_dim (partial rotary is not supported)")
    if head_dim % 2:
        raise ValueError(f"{source}: head_dim must be even for rotary embeddings, got {head_dim}")
    context = meta.positive_int(key("context_length"), default=arch.default_context_length)
    bos = meta.token_id("tokenizer.ggml.bos_token_id")
    eos_ids = [meta.token_id(f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot")]
    return ModelArchConfig(
        architecture=arch.hf_architecture,
        model_type=arch_name,
        hidden_size=hidden,
        intermediate_size=meta.positive_int(key("feed_forward_length")),
        num_hidden_layers=meta.positive_int(key("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=_vocab_size(meta, key("vocab_size"), tensors),
        rms_norm_eps=meta.positive_float(
            key("attention.layer_norm_rms_epsilon"), default=_DEFAULT_RMS_NORM_EPS
        ),
        rope_theta=meta.positive_float(key("rope.freq_base"), default=_DEFAULT_ROPE_THETA),
        rope_scaling=_rope_scaling(meta, arch_name),
        max_position_embeddings=context,
        tie_word_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        o_proj_bias="blk.0.attn_output.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors,
        qk_norm=arch.qk_norm,
        torch_dtype=None,  # mixed per tensor; quire computes GGUF models in fp32
        bos_token_id=bos,
        eos_token_ids=tuple(dict.fromkeys(i for i in eos_ids if i is not None)),
        sliding_window=None,
    )


def _check_same(meta: GGUFMetadata, key: str, expected: int, what: str) -> None:
    if meta.has(key) and meta.positive_int(key) != expected:
        raise ValueError(
            f"{meta.source}: metadata {key!r} is {meta.get(key)}, but must equal {what}: {expected}"
        )


def _vocab_size(meta: GGUFMetadata, key: str, tensors: dict[str, GGUFTensor]) -> int:
    # Older converters omit <arch>.vocab_size; the token list, then the embedding, says it.
    if meta.has(key):
        return meta.positive_int(key)
    tokens = meta.array_length("tokenizer.ggml.tokens")
    if tokens:
        return tokens
    embedding = tensors.get("token_embd.weight")
    if embedding is None:
        raise ValueError(f"{meta.source} has neither {key!r}, a token list, nor a token_embd.weight tensor")
    return int(embedding.shape[-1])  # GGUF lists dimensions innermost first: [hidden, vocab]


def _rope_scaling(meta: GGUFMetadata, arch_name: str) -> RopeScaling | None:
    scaling_type = meta.get(f"{arch_name}.rope.scaling.type")
    factor_key = f"{arch_name}.rope.scaling.factor"
    if scaling_type is None and meta.has(f"{arch_name}.rope.scale_linear"):  # older converters
        scaling_type, factor_key = "linear", f"{arch_name}.rope.scale_linear"
    if scaling_type in (None, "none"):
        return None
    if scaling_type != "linear":
        raise ValueError(
            f"{meta.source}: metadata {arch_name}.rope.scaling.type {scaling_type!r} is not supported "
            "for GGUF files; quire supports 'none' and 'linear'"
        )
    factor = meta.positive_float(factor_key)
    return None if factor == 1.0 else RopeScaling("linear", factor)
