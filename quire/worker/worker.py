"""Assemble what runs on one device: the model, its paged KV cache, and the model runner."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch

from quire.config import CacheConfig, ModelConfig
from quire.models.dtype_policy import choose_dtype, dtype_name
from quire.models.hf_config import ModelArchConfig
from quire.models.loader import load_model, read_arch_config
from quire.structured.manager import StructuredOutputManager
from quire.worker.host_memory import release_free_heap, retain_freed_memory
from quire.worker.kv_cache import allocate_kv_caches, num_blocks_for_memory, resolve_kv_cache_dtype
from quire.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass
class Worker:
    runner: ModelRunner
    arch: ModelArchConfig
    num_blocks: int
    max_model_len: int
    vocab_size: int
    dtype: torch.dtype
    device: torch.device

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        """What the KV cache stores (``--kv-cache-dtype``), as allocated."""
        return self.runner.kv_caches[0][0].dtype


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} was asked for, but torch sees no CUDA device")
    return device


def _plan_kv_cache(
    cache_config: CacheConfig, arch: ModelArchConfig, compute_dtype: torch.dtype
) -> tuple[torch.dtype, int]:
    """The KV cache's dtype and block count, resolved once (sizing and allocation must agree on
    the dtype) and said once at start-up, beside the dtype line."""
    kv_dtype = resolve_kv_cache_dtype(cache_config.kv_cache_dtype, compute_dtype)
    block_size = cache_config.block_size
    num_blocks = cache_config.num_blocks or num_blocks_for_memory(
        arch, block_size, kv_dtype, cache_config.kv_cache_memory
    )
    mode = "auto" if cache_config.kv_cache_dtype == "auto" else "explicit"
    line = (
        f"KV cache: {dtype_name(kv_dtype)} ({mode}), {num_blocks} blocks of {block_size} tokens "
        f"({num_blocks * block_size} tokens)"
    )
    logger.info(line)
    print(f"quire: {line}", file=sys.stderr, flush=True)
    return kv_dtype, num_blocks


def build_worker(
    model_config: ModelConfig,
    cache_config: CacheConfig,
    show_progress: bool = True,
    structured: StructuredOutputManager | None = None,
) -> Worker:
    """Load the model, allocate its KV cache and build the runner. ``structured`` is the runner's
    constrained-decoding hook (None: requests with ``structured_outputs`` are refused)."""
    device = resolve_device(model_config.device)
    arch = read_arch_config(model_config.model)  # a Hugging Face directory or a .gguf file
    dtype_choice = choose_dtype(model_config.dtype, arch.torch_dtype, device)
    dtype = dtype_choice.dtype
    # Once per start-up: what --dtype auto chose on this machine and why (issue 12).
    logger.info("dtype: %s", dtype_choice)
    print(f"quire: dtype: {dtype_choice}", file=sys.stderr, flush=True)
    # Sized before the weights load, so a budget that holds no block fails in a second.
    kv_dtype, num_blocks = _plan_kv_cache(cache_config, arch, dtype)
    # max_context_len is min(max_position_embeddings, sliding_window): sliding-window attention
    # is not implemented, so contexts are kept inside the window where full attention is exact.
    max_model_len = model_config.max_model_len or arch.max_context_len
    if max_model_len > arch.max_context_len:
        raise ValueError(
            f"max_model_len {max_model_len} exceeds the model's context length of {arch.max_context_len} "
            "(max_position_embeddings, or sliding_window where set, in config.json)"
        )
    if device.type == "cpu":
        retain_freed_memory()  # activations live in host memory: reuse them across steps
    torch.manual_seed(model_config.seed)
    model = load_model(
        model_config.model,
        dtype,
        device,
        progress=show_progress,
        max_positions=max_model_len,
        quantization=model_config.quantization,
        quantized_activations=model_config.quantized_activations,
        arch_config=arch,
    )

    block_size = cache_config.block_size
    kv_caches = allocate_kv_caches(arch, num_blocks, block_size, kv_dtype, device)
    if device.type == "cpu":
        release_free_heap()  # the loader's temporaries; see quire.worker.host_memory
    runner = ModelRunner(model, kv_caches, block_size, arch.vocab_size, device, structured=structured)
    return Worker(runner, arch, num_blocks, max_model_len, arch.vocab_size, dtype, device)
