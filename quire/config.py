"""Configuration: one frozen dataclass per concern, validated at construction.

Each component receives only its own sub-config (DESIGN.md principle 4). Validation raises
``ValueError`` with a message that tells the user what to change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType

_DTYPES = ("auto", "float32", "bfloat16", "float16")
# Weight-only quantization applied at load (vLLM's --quantization name): int8 -> Q8_0, int4 -> Q4_1.
QUANTIZATION_METHODS = ("int8", "int4")
# Opt-in activation quantization for quantized weights (--quantized-activations): "int8" quantizes x
# per 32-element block inside Q8_0/Q4_0/Q4_1 products (integer dot products, llama.cpp's approach).
# Off by default: logits then differ from the fp32 product with the dequantized weights.
QUANTIZED_ACTIVATIONS = ("int8",)
# --kv-cache-dtype: what the paged KV cache stores. "auto" is the model's compute dtype; bfloat16
# under fp32 compute halves the cache (twice the tokens per byte, half the bytes attention reads),
# at the price of rounding every cached K/V value to bf16. Aliases map to the canonical name.
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16")
KV_CACHE_DTYPE_ALIASES = MappingProxyType({"fp32": "float32", "bf16": "bfloat16"})
_MEMORY_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNIT_BYTES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_memory_size(value: int | float | str) -> int:
    """Parse ``"2GiB"``, ``"512MiB"``, ``"1.5G"`` or a plain number of bytes into bytes.

    A bare number below 1024 is read as GiB (``4`` means 4 GiB), because nobody sizes a KV
    cache in single bytes and ``--kv-cache-memory 4`` should do the obvious thing.
    """
    if isinstance(value, bool):
        raise ValueError(f"memory size must be a number or a string like '2GiB', got {value!r}")
    if isinstance(value, int | float):
        if value <= 0:
            raise ValueError(f"memory size must be positive, got {value!r}")
        return int(value * (1 << 30)) if value < 1024 else int(value)
    match = _MEMORY_RE.match(value)
    if not match:
        raise ValueError(f"cannot parse memory size {value!r}; use bytes or a unit, e.g. '2GiB' or '512MiB'")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    if not unit:
        return parse_memory_size(number)
    size = int(number * _UNIT_BYTES[unit[0]])
    if size <= 0:
        raise ValueError(f"memory size must be positive, got {value!r}")
    return size


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint to load and how.

    ``model`` is a local Hugging Face directory or a ``.gguf`` file. ``dtype="auto"`` picks
    float32 on a CPU (bf16 matmuls are slow without AVX-512 BF16) and the checkpoint's dtype on
    CUDA. ``quantization`` (``"int8"``/``"int4"``) keeps a Hugging Face checkpoint's decoder
    linears quantized in memory; a GGUF file is used as stored and refuses it at load.
    ``quantized_activations="int8"`` also quantizes the activations entering Q8_0/Q4_0/Q4_1 weights
    (faster decode, less exact); a model without such weights refuses it at load.
    """

    model: str
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    quantization: str | None = None
    quantized_activations: str | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model path must not be empty")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(
                f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} (or unset), "
                f"got {self.quantization!r}"
            )
        if self.quantized_activations is not None and self.quantized_activations not in QUANTIZED_ACTIVATIONS:
            raise ValueError(
                f"quantized_activations must be one of {', '.join(QUANTIZED_ACTIVATIONS)} (or unset), "
                f"got {self.quantized_activations!r}"
            )


def canonical_kv_cache_dtype(value: str) -> str:
    """``"bf16"`` -> ``"bfloat16"``; a ValueError naming the valid values for anything unknown."""
    name = KV_CACHE_DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value
    if name not in KV_CACHE_DTYPES:
        aliases = (f"{alias} (= {target})" for alias, target in KV_CACHE_DTYPE_ALIASES.items())
        valid = ", ".join([*KV_CACHE_DTYPES, *aliases])
        raise ValueError(f"kv_cache_dtype must be one of {valid}, got {value!r}")
    return name


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache geometry and policy.

    The pool size comes from ``kv_cache_memory`` (bytes) unless ``num_blocks`` is set
    explicitly (tests use a tiny pool to force preemption). ``kv_cache_dtype`` is what K/V are
    stored in (``KV_CACHE_DTYPES``; ``fp32``/``bf16`` are accepted and stored canonicalised);
    ``"auto"`` is the model's compute dtype, resolved by the worker once that is known.
    """

    block_size: int = 16
    kv_cache_memory: int = 1 << 30
    num_blocks: int | None = None
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        # Frozen: canonicalise the alias through object.__setattr__, once, here.
        object.__setattr__(self, "kv_cache_dtype", canonical_kv_cache_dtype(self.kv_cache_dtype))
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous-batching limits for one engine step.

    ``max_num_batched_tokens`` is the per-step token budget shared by decodes and prefill
    chunks; with ``enable_chunked_prefill`` a prompt longer than the budget is split across
    steps instead of stalling the running decodes.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}): every running sequence needs at least one token per step"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill, max_num_batched_tokens ({self.max_num_batched_tokens}) must be "
                f">= max_model_len ({self.max_model_len}) so that any prompt fits in one step; "
                "raise the budget or enable chunked prefill"
            )


@dataclass(frozen=True)
class EngineArgs:
    """Every user-facing engine knob in one place, as the CLI and ``LLM(...)`` accept them.

    Only the entry points see this; it is split into the per-concern configs above before any
    component is built. ``model=None`` means the built-in random-weight demo checkpoint.
    """

    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_memory: int | float | str = "1GiB"
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool = True
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    seed: int = 0
    show_progress: bool = True
    quantization: str | None = None
    quantized_activations: str | None = None
    kv_cache_dtype: str = "auto"

    def model_config(self, model_path: str) -> ModelConfig:
        return ModelConfig(
            model=model_path,
            dtype=self.dtype,
            device=self.device,
            max_model_len=self.max_model_len,
            seed=self.seed,
            quantization=self.quantization,
            quantized_activations=self.quantized_activations,
        )

    def cache_config(self) -> CacheConfig:
        return CacheConfig(
            block_size=self.block_size,
            kv_cache_memory=parse_memory_size(self.kv_cache_memory),
            num_blocks=self.num_kv_blocks,
            enable_prefix_caching=self.enable_prefix_caching,
            kv_cache_dtype=self.kv_cache_dtype,
        )

    def scheduler_config(self, max_model_len: int) -> SchedulerConfig:
        budget = self.max_num_batched_tokens
        if budget is None:
            # Big enough that a whole prompt usually prefills in one step, small enough that a
            # step with a prefill chunk does not stall decodes for long.
            budget = max(2048, self.max_num_seqs) if self.enable_chunked_prefill else max(max_model_len, 2048)
        return SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=budget,
            max_model_len=max_model_len,
            enable_chunked_prefill=self.enable_chunked_prefill,
        )
