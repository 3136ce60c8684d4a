"""Parse a Hugging Face ``config.json`` into the few numbers quire's models need.

Only what changes the computation is kept, in one frozen dataclass, so the model code never reads
raw dictionaries. Architecture quirks (which projections carry a bias, Qwen3's q/k norm) are
resolved here into plain flags, so the model has a single code path for all variants.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

CONFIG_FILE = "config.json"
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# transformers' default base when a config names no rope_theta.
_DEFAULT_ROPE_THETA = 10000.0
_DEFAULT_RMS_NORM_EPS = 1e-6


@dataclass(frozen=True)
class _ArchTraits:
    """How one architecture maps config flags onto the shared decoder."""

    qkv_bias: str  # "always", "never" or "flag" (follow config.attention_bias)
    o_proj_bias: str
    mlp_bias: str  # Llama alone honours config.mlp_bias
    qk_norm: bool
    sliding_window: str  # "flag": only when config.use_sliding_window; "always"; "never"
    default_max_position_embeddings: int


# Mirrors what transformers' modeling code does for each architecture, including fields it ignores
# (Mistral builds its projections without bias whatever attention_bias says).
_ARCH_TRAITS = MappingProxyType(
    {
        "LlamaForCausalLM": _ArchTraits("flag", "flag", "flag", False, "never", 2048),
        "MistralForCausalLM": _ArchTraits("never", "never", "never", False, "always", 4096 * 32),
        "Qwen2ForCausalLM": _ArchTraits("always", "never", "never", False, "flag", 32768),
        "Qwen3ForCausalLM": _ArchTraits("flag", "flag", "never", True, "flag", 32768),
    }
)
_DEFAULT_TRAITS = _ARCH_TRAITS["LlamaForCausalLM"]


@dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling. ``rope_type`` is ``"linear"`` or ``"llama3"``."""

    rope_type: str
    factor: float
    # llama3 only: frequencies are scaled by ``factor`` below the low-frequency cutoff, kept above
    # the high-frequency cutoff, and blended in between.
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class ModelArchConfig:
    """The shape and numerics of a decoder-only checkpoint, read from its ``config.json``."""

    architecture: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # q_proj, k_proj and v_proj carry a bias
    o_proj_bias: bool
    mlp_bias: bool
    qk_norm: bool  # per-head RMSNorm on q and k before RoPE (Qwen3)
    torch_dtype: str | None  # the checkpoint's stored dtype, e.g. "bfloat16"; None if not stated
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # Recorded, not applied: attention is always full. Past this many tokens a sliding-window model
    # would diverge from its reference, which is why ``max_context_len`` stops there.
    sliding_window: int | None

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def max_context_len(self) -> int:
        """Longest context computed exactly as the reference model would."""
        if self.sliding_window is None:
            return self.max_position_embeddings
        return min(self.max_position_embeddings, self.sliding_window)

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelArchConfig:
        """Read ``<path>/config.json``."""
        config_path = Path(path) / CONFIG_FILE
        if not config_path.is_file():
            raise ValueError(
                f"no {CONFIG_FILE} in {Path(path)}; point the model path at a Hugging Face checkpoint "
                "directory (the one holding config.json and *.safetensors)"
            )
        try:
            raw = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{config_path} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ValueError(f"{config_path} must hold a JSON object, got {type(raw).__name__}")
        return cls.from_dict(raw, source=str(config_path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = CONFIG_FILE) -> ModelArchConfig:
        """Parse an already loaded config dict; ``source`` names it in error messages."""
        fields = _Fields(raw, source)
        architectures = raw.get("architectures") or []
        if not isinstance(architectures, list) or not architectures:
            raise ValueError(f"{source}: 'architectures' must be a non-empty list, e.g. ['LlamaForCausalLM']")
        architecture = str(architectures[0])
        traits = _ARCH_TRAITS.get(architecture, _DEFAULT_TRAITS)

        hidden_act = raw.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"{source}: hidden_act {hidden_act!r} is not supported; only 'silu' is")

        hidden_size = fields.positive_int("hidden_size")
        num_heads = fields.positive_int("num_attention_heads")
        num_kv_heads = fields.positive_int("num_key_value_heads", default=num_heads)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"{source}: num_attention_heads ({num_heads}) must be a multiple of "
                f"num_key_value_heads ({num_kv_heads})"
            )
        head_dim = fields.positive_int("head_dim", default=hidden_size // num_heads)
        if head_dim % 2:
            raise ValueError(f"{source}: head_dim must be even for rotary embeddings, got {head_dim}")
        max_positions = fields.positive_int(
            "max_position_embeddings", default=traits.default_max_position_embeddings
        )
        rope_theta, rope_scaling = _parse_rope(raw, source, max_positions)
        attention_bias = fields.boolean("attention_bias", default=False)

        return cls(
            architecture=architecture,
            model_type=str(raw.get("model_type", "")),
            hidden_size=hidden_size,
            intermediate_size=fields.positive_int("intermediate_size"),
            num_hidden_layers=fields.positive_int("num_hidden_layers"),
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_dim,
            vocab_size=fields.positive_int("vocab_size"),
            rms_norm_eps=fields.positive_float("rms_norm_eps", default=_DEFAULT_RMS_NORM_EPS),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_positions,
            tie_word_embeddings=fields.boolean("tie_word_embeddings", default=False),
            qkv_bias=_apply_rule(traits.qkv_bias, attention_bias),
            o_proj_bias=_apply_rule(traits.o_proj_bias, attention_bias),
            mlp_bias=_apply_rule(traits.mlp_bias, fields.boolean("mlp_bias", default=False)),
            qk_norm=traits.qk_norm,
            torch_dtype=_parse_dtype(raw),
            bos_token_id=_parse_bos(raw.get("bos_token_id"), source),
            eos_token_ids=_parse_token_ids(raw.get("eos_token_id"), "eos_token_id", source),
            sliding_window=_parse_sliding_window(raw, traits, fields),
        )


def _apply_rule(rule: str, flag: bool) -> bool:
    return {"always": True, "never": False, "flag": flag}[rule]


class _Fields:
    """Typed reads from a raw config dict with errors that name the field and the file."""

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self._raw = raw
        self._source = source

    def _get(self, name: str, default: Any) -> Any:
        value = self._raw.get(name)
        if value is None:
            if default is None:
                raise ValueError(f"{self._source} is missing the required field {name!r}")
            return default
        return value

    def positive_int(self, name: str, default: int | None = None) -> int:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{self._source}: {name!r} must be a positive integer, got {value!r}")
        return value

    def positive_float(self, name: str, default: float | None = None) -> float:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"{self._source}: {name!r} must be a positive number, got {value!r}")
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            raise ValueError(f"{self._source}: {name!r} must be true or false, got {value!r}")
        return value


def _parse_rope(raw: dict[str, Any], source: str, max_positions: int) -> tuple[float, RopeScaling | None]:
    """RoPE base and scaling from either spelling transformers has used.

    transformers < 5 writes ``rope_theta`` at the top level and an optional ``rope_scaling`` dict
    (with ``type`` or ``rope_type``); transformers 5 writes one ``rope_parameters`` dict holding
    ``rope_type``, ``rope_theta`` and the scaling fields. When both appear, the v5 dict wins.
    """
    field = "rope_parameters" if raw.get("rope_parameters") else "rope_scaling"
    params = raw.get(field) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{source}: {field!r} must be an object, got {params!r}")
    if any(isinstance(value, dict) for value in params.values()):
        raise ValueError(f"{source}: per-layer-type {field!r} (nested objects) are not supported")
    theta = params.get("rope_theta", raw.get("rope_theta", _DEFAULT_ROPE_THETA))
    if isinstance(theta, bool) or not isinstance(theta, int | float) or not theta > 0:
        raise ValueError(f"{source}: rope_theta must be a positive number, got {theta!r}")
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor {partial!r} is not supported (only 1.0)")

    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default", "none"):
        return float(theta), None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"{source}: {field}.rope_type {rope_type!r} is not supported; "
            f"quire supports: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    scaling_fields = _Fields(params, f"{source} ({field})")
    factor = scaling_fields.positive_float("factor")
    if rope_type == "linear":
        return float(theta), RopeScaling("linear", factor)
    low = scaling_fields.positive_float("low_freq_factor")
    high = scaling_fields.positive_float("high_freq_factor")
    if not high > low:
        raise ValueError(f"{source}: {field}.high_freq_factor ({high}) must exceed low_freq_factor ({low})")
    # transformers falls back to max_position_embeddings when the original length is not given.
    original = scaling_fields.positive_int("original_max_position_embeddings", default=max_positions)
    return float(theta), RopeScaling("llama3", factor, low, high, original)


def _parse_dtype(raw: dict[str, Any]) -> str | None:
    # transformers 5 writes "dtype"; older versions "torch_dtype".
    value = raw.get("dtype") or raw.get("torch_dtype")
    if value is None:
        return None
    return str(value).removeprefix("torch.")


def _parse_token_ids(value: Any, name: str, source: str) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{source}: {name!r} must be a token id or a list of them, got {value!r}")
    return tuple(values)


def _parse_bos(value: Any, source: str) -> int | None:
    ids = _parse_token_ids(value, "bos_token_id", source)
    if len(ids) > 1:
        raise ValueError(f"{source}: 'bos_token_id' must be a single token id, got {value!r}")
    return ids[0] if ids else None


def _parse_sliding_window(raw: dict[str, Any], traits: _ArchTraits, fields: _Fields) -> int | None:
    if traits.sliding_window == "never" or raw.get("sliding_window") is None:
        return None
    if traits.sliding_window == "flag" and not fields.boolean("use_sliding_window", default=False):
        return None
    return fields.positive_int("sliding_window")
