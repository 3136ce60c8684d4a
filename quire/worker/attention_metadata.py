"""What one forward step tells the attention layers: where new K/V goes and what each query sees.

Tokens of a step are laid out decodes first (one token per sequence), then prefill chunks
(one contiguous run of tokens per sequence). The model runner builds this; every attention
backend reads it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrefillChunk:
    """One sequence's run of query tokens in this step (a whole prompt, a chunk of it, or a
    recompute after preemption)."""

    query_start: int  # offset of the chunk's first token in the step's flat token array
    query_len: int  # tokens in this chunk
    num_computed: int  # tokens of this sequence whose K/V were already in the cache before this step
    block_ids: torch.Tensor  # [ceil((num_computed + query_len) / block_size)] int64, the block table


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset for each new token
    num_decodes: int  # the first num_decodes tokens are single-token decodes, one per sequence
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int64, rows padded with 0
    decode_seq_lens: torch.Tensor  # [num_decodes] int64: context length including the new token
    prefills: tuple[PrefillChunk, ...]  # the remaining tokens, in order
    block_size: int

    @functools.cached_property
    def prefill_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefill chunks as two tensors, for kernels that take every chunk in one call:
        ``[num_chunks, 3]`` int64 rows of (query_start, query_len, num_computed), and their block
        tables ``[num_chunks, max_blocks]`` int64, rows padded with 0. Built once per step (the
        metadata is shared by every layer) on the first layer that asks."""
        device = self.slot_mapping.device
        chunks = torch.tensor(
            [[c.query_start, c.query_len, c.num_computed] for c in self.prefills], dtype=torch.int64
        ).reshape(-1, 3)
        max_blocks = max((c.block_ids.numel() for c in self.prefills), default=0)
        tables = torch.zeros(len(self.prefills), max_blocks, dtype=torch.int64)
        for row, chunk in zip(tables, self.prefills, strict=True):
            row[: chunk.block_ids.numel()] = chunk.block_ids
        return chunks.to(device), tables.to(device)
