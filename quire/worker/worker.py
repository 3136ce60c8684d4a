"""Assemble what runs on one device: the model, its paged KV cache, and the model runner."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch

from quire.config import CacheConfig, ModelConfig
from quire.models.dtype_policy import choose_dtype
from quire.models.hf_config import ModelArchConfig
from quire.models.loader import load_model, read_arch_config
from quire.structured.manager import StructuredOutputManager
from quire.worker.host_memory import release_free_heap, retain_freed_memory
from quire.worker.kv_cache import allocate_kv_caches, num_blocks_for_memory
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


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} was asked for, but torch sees no CUDA device")
    return device


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
    num_blocks = cache_config.num_blocks or num_blocks_for_memory(
        arch, block_size, dtype, cache_config.kv_cache_memory
    )
    kv_caches = allocate_kv_caches(arch, num_blocks, block_size, dtype, device)
    if device.type == "cpu":
        release_free_heap()  # the loader's temporaries; see quire.worker.host_memory
    runner = ModelRunner(model, kv_caches, block_size, arch.vocab_size, device, structured=structured)
    logger.info(
        "KV cache: %d blocks of %d tokens (%d tokens)", num_blocks, block_size, num_blocks * block_size
    )
    return Worker(runner, arch, num_blocks, max_model_len, arch.vocab_size, dtype, device)
