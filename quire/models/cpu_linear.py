"""A linear layer's weight prepared for fast fp32 products on CPU.

ATen's fp32 matmul on CPU goes to MKL, which on non-Intel x86 CPUs (this project's AMD/AVX2
machines) takes a slow generic path. Two replacements, chosen per call by the number of rows:

- oneDNN with the weight pre-blocked once at load (``torch.ops.mkldnn._reorder_linear_weight``):
  oneDNN JITs AVX2 kernels on any x86 CPU, and packing once saves re-blocking the weight per call.
  Measured on smollm2-135m layer shapes against ATen: ~1.5x at 1 row, ~2x at 4-8 rows, ~1.2x at
  32-256 rows; the LM head ~2x at 1-32 rows.
- For a few rows (decode at low concurrency), a product is bound by reading the weight from
  memory. Checkpoints are commonly stored in bf16; when every weight value is exactly a bf16
  number, a bf16 copy holds the same values in half the bytes, and the compiled kernel
  (``bf16_weight_linear``) widens it to fp32 in registers: the same fp32 arithmetic on the same
  values, at about half the memory traffic.

GPUs, other dtypes and ``QUIRE_CPU_KERNELS=0`` keep plain ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quire.kernels.cpu_ops import cpu_kernels_enabled, cpu_ops

# The batch size oneDNN tunes its blocking for; any batch size works with the packed weight.
_PACK_BATCH_HINT = 64
# Row counts up to this use the bf16-weight kernel; more rows amortise the weight read and
# oneDNN's blocked GEMM wins.
BF16_MAX_ROWS = 12


def cpu_fast_linear_available(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and cpu_kernels_enabled()
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class CpuLinearWeight:
    """Prepared copies of one ``[out, in]`` fp32 weight; call it like ``F.linear(x, weight, bias)``."""

    def __init__(self, weight: torch.Tensor) -> None:
        assert cpu_fast_linear_available(weight), "check cpu_fast_linear_available first"
        weight = weight.contiguous()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_BATCH_HINT)
        self.bf16: torch.Tensor | None = None
        self._ops = cpu_ops()
        if self._ops is not None:
            bf16 = weight.to(torch.bfloat16)
            if torch.equal(bf16.float(), weight):  # exact, so the kernel computes the same products
                self.bf16 = bf16

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.bf16 is not None and x.shape[0] <= BF16_MAX_ROWS and x.dim() == 2:
            return self._ops.bf16_weight_linear(x.contiguous(), self.bf16, bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fast: CpuLinearWeight | None):
    """``F.linear`` through the prepared weight where there is one."""
    return F.linear(x, weight, bias) if fast is None else fast(x, bias)
