"""Allocation and sizing of the paged KV cache tensors the attention backends read and write."""

from __future__ import annotations

import torch

from quire.models.dtype_policy import DTYPES
from quire.models.hf_config import ModelArchConfig
from quire.worker.host_memory import advise_huge_pages


def resolve_kv_cache_dtype(kv_cache_dtype: str, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype the KV cache is allocated in: ``"auto"`` is the model's compute dtype (what the
    cache always used); otherwise the dtype named (``CacheConfig`` has canonicalised it).

    Every attention path reads K/V back in the compute dtype, so a cache narrower than it (bf16
    under fp32 compute) rounds K/V once, when they are stored."""
    if kv_cache_dtype == "auto":
        return compute_dtype
    if kv_cache_dtype not in DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}")
    return DTYPES[kv_cache_dtype]


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kv_cache_bytes_per_block(arch_config: ModelArchConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block costs across all layers, K and V together."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    per_layer = block_size * arch_config.num_key_value_heads * arch_config.head_dim * _element_size(dtype)
    return 2 * arch_config.num_hidden_layers * per_layer


def num_blocks_for_memory(
    arch_config: ModelArchConfig, block_size: int, dtype: torch.dtype, memory_bytes: int
) -> int:
    """How many blocks fit in ``memory_bytes``; raises if not even one does."""
    per_block = kv_cache_bytes_per_block(arch_config, block_size, dtype)
    num_blocks = memory_bytes // per_block
    if num_blocks < 1:
        raise ValueError(
            f"kv cache memory of {memory_bytes} bytes holds no block of {block_size} tokens "
            f"({per_block} bytes each for this model); raise kv_cache_memory or lower block_size"
        )
    return num_blocks


def allocate_kv_caches(
    arch_config: ModelArchConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: str | torch.device,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer a ``(k_cache, v_cache)`` pair, each ``[num_blocks, block_size, kv_heads, head_dim]``.

    One zeroed allocation backs every layer. Zeroing matters: attention masks padding slots by
    score, and uninitialised memory can hold NaN/inf, which would leak through ``0 * NaN``.
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    shape = (
        arch_config.num_hidden_layers,
        2,
        num_blocks,
        block_size,
        arch_config.num_key_value_heads,
        arch_config.head_dim,
    )
    storage = torch.empty(shape, dtype=dtype, device=device)
    advise_huge_pages(storage)  # before the zeros below first touch the pages
    storage.zero_()
    # storage[layer, 0] is contiguous (leading-dimension slice), as the backends require.
    return [(storage[layer, 0], storage[layer, 1]) for layer in range(arch_config.num_hidden_layers)]
