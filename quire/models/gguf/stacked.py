"""A fused projection whose row blocks are stored in different formats.

llama.cpp's mixed quantizations give the tensors of one fused quire projection different types
(``Q4_K_M`` stores attn_v in Q6_K beside Q4_K attn_q/attn_k). Rather than dequantizing them to a
dense fp32 copy (4-8x the file's bytes), each run of same-typed rows keeps its own method and the
outputs are concatenated: one extra copy of the activations per call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from quire.models.llama import LinearMethod


class DenseRows:
    """A dense fp32 ``[out, in]`` block of rows (an F32/F16/BF16 tensor beside quantized ones)."""

    def __init__(self, weight: torch.Tensor) -> None:
        if weight.dim() != 2 or weight.dtype != torch.float32:
            raise ValueError(f"weight must be a 2-D float32 tensor, got {weight.dtype} {tuple(weight.shape)}")
        self.weight = weight.contiguous()
        self.out_features, self.in_features = weight.shape

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, self.weight, bias)

    def dequantize(self) -> torch.Tensor:
        return self.weight


class StackedLinearWeight:
    """Row blocks ``parts`` (each a linear method over the same input) acting as one weight."""

    def __init__(self, parts: Sequence[LinearMethod]) -> None:
        if len(parts) < 2:
            raise ValueError(f"StackedLinearWeight needs at least two parts, got {len(parts)}")
        in_features = {part.in_features for part in parts}
        if len(in_features) != 1:
            raise ValueError(f"StackedLinearWeight parts must share in_features, got {sorted(in_features)}")
        self.parts = tuple(parts)
        self.in_features = in_features.pop()
        self.out_features = sum(part.out_features for part in parts)

    @property
    def nbytes(self) -> int:
        return sum(int(getattr(part, "nbytes", 0)) for part in self.parts)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.cat([part(x) for part in self.parts], dim=-1)
        return out if bias is None else out + bias

    def dequantize(self) -> torch.Tensor:
        return torch.cat([part.dequantize() for part in self.parts])  # type: ignore[attr-defined]
