"""A batch's allowed-token bitmasks, and applying them to logits in place.

Layout (llguidance's and xgrammar's): int32 words, bit ``j`` of word ``w`` allows token
``32 * w + j``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenBitmask:
    """The tokens the constrained rows of a batch may take next.

    ``rows`` are the constrained rows of the sampler's batch, ascending; ``bitmask`` row ``i``
    belongs to batch row ``rows[i]``. Rows not listed are unconstrained."""

    rows: list[int]
    bitmask: torch.Tensor  # int32 [len(rows), >= ceil(vocab / 32)], on the CPU

    def __post_init__(self) -> None:
        if self.bitmask.dim() != 2 or self.bitmask.shape[0] != len(self.rows):
            raise ValueError(
                f"the bitmask needs one row per constrained row: {tuple(self.bitmask.shape)} for "
                f"{len(self.rows)} rows"
            )
        if self.bitmask.dtype != torch.int32:
            raise ValueError(f"the bitmask must be int32, got {self.bitmask.dtype}")


def unpack_bitmask(bitmask: torch.Tensor, vocab: int, device: torch.device) -> torch.Tensor:
    """Bool ``[rows, vocab]``: True where the token is allowed."""
    if bitmask.shape[1] * 32 < vocab:
        raise ValueError(f"a bitmask of {bitmask.shape[1]} words cannot cover a vocabulary of {vocab}")
    words = bitmask.to(device)
    shifts = torch.arange(32, dtype=torch.int32, device=device)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # arithmetic shift; the & 1 keeps only bit j
    return bits.view(words.shape[0], -1)[:, :vocab].bool()


def apply_token_bitmask_(logits: torch.Tensor, mask: TokenBitmask) -> None:
    """Set the logits of disallowed tokens of the constrained rows to -inf, in place.

    ``logits`` is ``[batch, vocab]``; unconstrained rows are not touched."""
    if not mask.rows:
        return
    num_rows, vocab = logits.shape
    allowed = unpack_bitmask(mask.bitmask, vocab, logits.device)
    if len(mask.rows) == num_rows:
        logits.masked_fill_(~allowed, -math.inf)
        return
    index = torch.tensor(mask.rows, dtype=torch.long, device=logits.device)
    sub = logits.index_select(0, index)
    sub.masked_fill_(~allowed, -math.inf)
    logits.index_copy_(0, index, sub)
