"""A linear layer's weight prepared once at load for fast fp32 products on CPU.

ATen's fp32 matmul on CPU goes to MKL, which on non-Intel x86 CPUs (this project's AMD/AVX2
machines) takes a slow generic path. Two replacements, best first:

- The compiled panel GEMM (``packed_linear`` in ``quire/kernels/csrc/packed_gemm.cpp``): the
  weight re-laid out in 16-column panels for a register-tiled AVX2 kernel. Checkpoints are
  commonly stored in bf16; when every weight value is exactly a bf16 number the panels hold bf16
  (half the bytes to stream per step) and are widened to fp32 in registers: the same fp32
  arithmetic on the same values. Measured on smollm2-135m's 30 layers (weights streamed from
  memory, as in serving), against oneDNN's packed fp32 GEMM: ~2x at 1-16 rows, 1.3-1.8x at 32,
  1.1-1.3x at 256-2048; against the former row-wise bf16 kernel, equal at 1-8 rows and faster beyond.
- Where the kernels cannot be built: oneDNN with the weight pre-blocked once
  (``torch.ops.mkldnn._reorder_linear_weight``), which JITs AVX2 code on any x86 CPU.

GPUs, other dtypes and ``QUIRE_CPU_KERNELS=0`` keep plain ``F.linear``.
"""

from __future__ import annotations

import torch

from quire.kernels.cpu_ops import cpu_kernels_enabled, cpu_ops

# The batch size oneDNN tunes its blocking for; any batch size works with the packed weight.
_ONEDNN_BATCH_HINT = 64


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def cpu_fast_linear_available(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and cpu_kernels_enabled()
        and (cpu_ops() is not None or _onednn_available())
    )


def is_bf16_exact(weight: torch.Tensor) -> bool:
    """Whether every value of an fp32 tensor is exactly representable in bf16 (low 16 bits zero)."""
    return not bool((weight.contiguous().view(torch.int32) & 0xFFFF).any())


class CpuLinearWeight:
    """One ``[out, in]`` fp32 weight, prepared; call it like ``F.linear(x, weight, bias)``.

    Only the prepared copy is kept: the caller may free the dense weight afterwards."""

    def __init__(self, weight: torch.Tensor) -> None:
        assert cpu_fast_linear_available(weight), "check cpu_fast_linear_available first"
        weight = weight.contiguous()
        self.out_features, self.in_features = weight.shape
        self._ops = cpu_ops()
        self.stores_bf16 = False
        if self._ops is not None:
            self.stores_bf16 = is_bf16_exact(weight)
            self.panels = self._ops.pack_weight_panels(weight, self.stores_bf16)
        else:
            self.panels = torch.ops.mkldnn._reorder_linear_weight(weight, _ONEDNN_BATCH_HINT)

    @property
    def uses_onednn(self) -> bool:
        """True where the compiled kernels are missing and oneDNN's packed weight is used."""
        return self._ops is None

    def fused_decode_operand(self) -> object | None:
        """This weight as an operand of the compiled whole-layer decode kernel (a
        ``LinearOperand`` over the panels), or None where it is held by oneDNN instead."""
        if self._ops is None:
            return None
        return self._ops.LinearOperand.panels(self.panels, self.out_features)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self._ops is None:
            return torch.ops.mkldnn._linear_pointwise(x, self.panels, bias, "none", [], "")
        if x.dim() != 2:
            return self(x.reshape(-1, x.shape[-1]), bias).view(*x.shape[:-1], self.out_features)
        return self._ops.packed_linear(x.contiguous(), self.panels, self.out_features, bias)
