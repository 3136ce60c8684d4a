"""What one forward step tells the attention layers: where new K/V goes and what each query sees.

Tokens of a step are laid out decodes first (one token per sequence), then prefill chunks
(one contiguous run of tokens per sequence). The model runner builds this; every attention
backend reads it.
"""

from __future__ import annotations

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
