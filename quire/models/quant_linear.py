"""Linear weights kept in GGUF block formats, multiplied without unpacking them in memory.

A :class:`QuantizedLinearWeight` holds a ``[out_features, in_features]`` weight as GGUF stores
it: each output row is a run of fixed-size blocks, each block a few f16 scales and packed
integers (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K). Only those bytes stay resident (about 1/4 to 1/6
of fp32); the compiled kernels (``quire/kernels/csrc/quant_gemm.cpp``) decode blocks inside the
matrix multiply. Activations stay fp32: the weight is the only thing quantized.

Dequantizing here is bit-identical to ``gguf.quants.dequantize`` (gguf-py computes in fp32 with
the f16 scales widened, one rounding per operation, no fused multiply-add), so a quantized model
can be checked against its fp32 dequantized twin. Without the compiled kernels every product
dequantizes the weight and calls ``F.linear`` (slow, but the same numbers up to summation order).

``quantize_weight`` turns an fp32 weight into Q8_0 (``int8``) or Q4_1 (``int4``) at load time,
bit-identical to ``gguf.quants.quantize``. Q4_1 over Q4_0 for int4: one more f16 per 32 weights
(5.0 instead of 4.5 bits) buys an offset, so rows not centred on zero lose less (~20% lower mean
error in tests/test_quant_kernels.py), and the demo GGUF model uses it, so its kernel is tuned.

Q8_0 / Q4_0 / Q4_1 are kept with 8 output rows interleaved (``interleave_rows``: a permutation
of the file's bytes, see below), which the decode kernel reads 8 columns at a time.

Opt-in int8 activations (``--quantized-activations int8``, ``apply_quantized_activations``): the
Q8_0 / Q4_0 / Q4_1 weights switch to the quad layout and every product quantizes x per 32-element
block to int8 (llama.cpp's approach) for integer dot products (``csrc/quant_a8.cpp``; VNNI where
the CPU has it). ~1.7-2.9x the bf16 panel GEMM at 1 and 32 rows (benchmarks/quant_gemm.py --a8),
but logits move by ~1% of their spread, so the exact fp32-activation path stays the default.
``int8_activation_reference`` is its math in torch (the tests' reference and the fallback).

Speed today (``benchmarks/quant_gemm.py``: smollm2-135m shapes, weights streamed from memory, 2
AVX2 cores of an AMD EPYC Zen 1, against the bf16 panel GEMM of ``cpu_linear.py``; a loaded
machine): at 1 row Q4_1 ~1.35-1.4x, Q8_0 ~1.2x (GGUF's row layout: ~1.0x); at 4 rows ~0.85-1.05x;
at 32 rows ~0.95-1.0x; Q4_K ~0.95x at 1 row. Widening the integer quants to fp32 (a conversion
and an FMA per 8 weights, ~2.5 cycles) bounds the kernels on this CPU: the gain is memory (Q4_1
keeps 5/16 of bf16's bytes) more than time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quire.config import QUANTIZATION_METHODS, QUANTIZED_ACTIVATIONS
from quire.kernels.cpu_ops import cpu_ops

_QK_K = 256  # elements per K-quant super-block

Dequantizer = Callable[[torch.Tensor], torch.Tensor]  # uint8 [blocks, block_bytes] -> fp32 [blocks, elems]
Quantizer = Callable[[torch.Tensor], torch.Tensor]  # fp32 [blocks, elems] -> uint8 [blocks, block_bytes]


@dataclass(frozen=True)
class QuantFormat:
    """One GGUF block format: how many weights a block holds, in how many bytes, and how to decode it."""

    name: str
    ggml_type: int  # the GGML type id (gguf.GGMLQuantizationType), also the compiled kernels' type id
    block_elems: int
    block_bytes: int
    dequantize_blocks: Dequantizer
    quantize_blocks: Quantizer | None = None  # None where quire cannot produce the format
    # Bytes of f16 fields heading each block, for formats kept in the interleaved layout (see
    # interleave_rows); 0: the format stays in GGUF's row layout.
    interleave_head: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("QuantFormat.name must be non-empty")
        if self.ggml_type < 0:
            raise ValueError(f"QuantFormat {self.name}: ggml_type must be >= 0, got {self.ggml_type}")
        if self.block_elems <= 0 or self.block_elems % 16:
            raise ValueError(f"QuantFormat {self.name}: block_elems must be a positive multiple of 16")
        if not 0 < self.block_bytes < 4 * self.block_elems:
            raise ValueError(f"QuantFormat {self.name}: block_bytes must be in (0, 4 * block_elems)")
        if self.interleave_head < 0 or self.interleave_head % 2 or self.interleave_head >= self.block_bytes:
            raise ValueError(
                f"QuantFormat {self.name}: interleave_head must be an even byte count below block_bytes"
            )

    def row_bytes(self, in_features: int) -> int:
        return in_features // self.block_elems * self.block_bytes

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block_elems


# --- decoding, operation by operation as gguf-py does it ------------------------------------------


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The f16 at byte ``start`` of every block, widened to fp32: [blocks, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(packed: torch.Tensor, group: int) -> torch.Tensor:
    """Split [blocks, n] bytes in runs of ``group``: each run's low nibbles, then its high nibbles."""
    runs = packed.reshape(packed.shape[0], -1, 1, group)
    return torch.cat([runs & 0x0F, runs >> 4], dim=2).reshape(packed.shape[0], -1)


def _dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[:, 2:].contiguous().view(torch.int8).to(torch.float32) * _f16(blocks, 0)


def _dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 2:], 16).to(torch.int8) - 8
    return _f16(blocks, 0) * q.to(torch.float32)


def _dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 4:], 16).to(torch.float32)
    return _f16(blocks, 0) * q + _f16(blocks, 2)  # two roundings, as gguf-py (not a fused multiply-add)


def _k_scales_mins(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: the 8 6-bit scales and 8 6-bit mins packed in 12 bytes (low 6 bits of bytes 0-3
    and 4-7 hold sub-blocks 0-3; bytes 8-11 hold the low 4 bits of sub-blocks 4-7, whose top 2
    bits sit in the spare top bits of bytes 0-7)."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc.to(torch.float32), mn.to(torch.float32)


def _k_affine(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    sc, mn = _k_scales_mins(blocks[:, 4:16])
    scale = (_f16(blocks, 0) * sc).unsqueeze(-1)  # [blocks, 8, 1]
    offset = (_f16(blocks, 2) * mn).unsqueeze(-1)
    return (scale * q.reshape(-1, 8, 32).to(torch.float32) - offset).reshape(-1, _QK_K)


def _dequantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    return _k_affine(blocks, _nibbles(blocks[:, 16:144], 32))


def _dequantize_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    low = _nibbles(blocks[:, 48:176], 32).reshape(-1, 8, 32)
    shifts = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
    high = (blocks[:, 16:48].reshape(-1, 1, 32) >> shifts) & 1  # bit j of byte l: sub-block j, element l
    return _k_affine(blocks, low | (high << 4))


def _dequantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    low = _nibbles(blocks[:, :128], 64).reshape(-1, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    high = ((blocks[:, 128:192].reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(-1, 16, 16).to(torch.float32)
    scales = blocks[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    return ((_f16(blocks, 208) * scales).unsqueeze(-1) * q).reshape(-1, _QK_K)


# --- encoding (Q8_0 and Q4_1), operation by operation as gguf-py does it ---------------------------


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    a = x.abs()
    floored = a.floor()
    return x.sign() * (floored + (2 * (a - floored)).floor())


def _reciprocal_or_zero(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _quantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    qs = _round_half_away(blocks * _reciprocal_or_zero(d))
    return torch.cat([d.to(torch.float16).view(torch.uint8), qs.to(torch.int8).view(torch.uint8)], dim=1)


def _quantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    high = blocks.amax(dim=1, keepdim=True)
    low = blocks.amin(dim=1, keepdim=True)
    d = (high - low) / 15
    q = ((blocks - low) * _reciprocal_or_zero(d) + 0.5).trunc().to(torch.uint8).clamp(0, 15)
    packed = q[:, :16] | (q[:, 16:] << 4)
    return torch.cat(
        [d.to(torch.float16).view(torch.uint8), low.to(torch.float16).view(torch.uint8), packed], dim=1
    )


QUANT_TYPES: dict[str, QuantFormat] = {
    fmt.name: fmt
    for fmt in (
        QuantFormat("Q4_0", 2, 32, 18, _dequantize_q4_0, interleave_head=2),
        QuantFormat("Q4_1", 3, 32, 20, _dequantize_q4_1, _quantize_q4_1, interleave_head=4),
        QuantFormat("Q8_0", 8, 32, 34, _dequantize_q8_0, _quantize_q8_0, interleave_head=2),
        QuantFormat("Q4_K", 12, _QK_K, 144, _dequantize_q4_k),
        QuantFormat("Q5_K", 13, _QK_K, 176, _dequantize_q5_k),
        QuantFormat("Q6_K", 14, _QK_K, 210, _dequantize_q6_k),
    )
}

# --quantization method (quire.config.QUANTIZATION_METHODS) -> the block format it produces.
METHOD_FORMATS: dict[str, str] = {"int8": "Q8_0", "int4": "Q4_1"}
assert tuple(METHOD_FORMATS) == QUANTIZATION_METHODS, "every --quantization method needs a format"
# The method the token embedding (and so a tied LM head) gets under each --quantization: 8 bits for
# both. The LM head sets the logits directly, so it keeps the finer format (as llama.cpp's 4-bit
# files keep their output matrix at 6 or 8 bits); it is still a quarter of bf16's bytes, which
# matters because in a small model it is a large share of each decode step's reads (a fifth of
# smollm2-135m's weights).
VOCAB_METHODS: dict[str, str] = {"int8": "int8", "int4": "int8"}
assert tuple(VOCAB_METHODS) == QUANTIZATION_METHODS, "every --quantization method needs a vocabulary method"


# --- the interleaved layout -------------------------------------------------------------------------
# Q8_0 / Q4_0 / Q4_1 weights are kept with 8 output rows interleaved, so the decode kernel holds 8
# output columns in the 8 lanes of a vector: per group of 8 rows and block index, each f16 header
# field of the 8 rows (16 bytes per field), then quant byte j of the 8 rows for every j. One k step
# is then one 8-byte load, and the scales load as one vector: at 1-4 rows of x ~1.3x faster than
# dotting GGUF's row-contiguous blocks (benchmarks/quant_gemm.py). It permutes the file's bytes
# (rows padded with zero bytes to a multiple of 8), so nothing is expanded; the kernels' side is
# kInterleavedFlag in quant_blocks.h.
_GROUP = 8
INTERLEAVED_FLAG = 256  # added to a GGML type id: quant_linear gets the interleaved layout (quant_blocks.h)
INT8_ACTIVATIONS_FLAG = 512  # instead: the quad layout, and x quantized to int8 in the kernel (quant_a8.h)


# With int8 activations (QUANTIZED_ACTIVATIONS) the quant bytes go in runs of 4 per row instead
# of 1 (the "quad layout", kInt8ActivationsFlag in quant_a8.h): one 32-byte load then holds 4
# consecutive quant bytes of each of the 8 rows, what vpdpbusd / vpmaddubsw multiply per 32-bit lane.
QUAD_RUN = 4


def interleave_rows(rows: torch.Tensor, fmt: QuantFormat, run: int = 1) -> torch.Tensor:
    """GGUF rows uint8 [n, row_bytes] -> the interleaved layout [ceil(n / 8) * 8, row_bytes]: per
    group and block, the 8 rows' header fields, then their quant bytes in runs of ``run`` per row
    (1: the interleaved layout, QUAD_RUN: the quad layout)."""
    n, row_bytes = rows.shape
    padded = -(-n // _GROUP) * _GROUP
    if padded != n:
        rows = torch.cat([rows, rows.new_zeros(padded - n, row_bytes)])
    head, block_bytes = fmt.interleave_head, fmt.block_bytes
    blocks = rows.reshape(padded // _GROUP, _GROUP, -1, block_bytes).transpose(1, 2)  # [G, nb, 8, bytes]
    groups, nb = blocks.shape[:2]
    fields = blocks[..., :head].reshape(groups, nb, _GROUP, head // 2, 2).transpose(2, 3)
    quants = blocks[..., head:].reshape(groups, nb, _GROUP, -1, run).transpose(2, 3)
    return torch.cat([fields.reshape(groups, nb, -1), quants.reshape(groups, nb, -1)], dim=2).reshape(
        padded, row_bytes
    )


def deinterleave_groups(packed: torch.Tensor, fmt: QuantFormat, run: int = 1) -> torch.Tensor:
    """The inverse of interleave_rows for whole groups: uint8 [8 * g, row_bytes] -> GGUF rows, same shape."""
    head, block_bytes = fmt.interleave_head, fmt.block_bytes
    groups, row_bytes = packed.shape[0] // _GROUP, packed.shape[1]
    chunks = packed.reshape(groups, -1, _GROUP * block_bytes)  # [G, nb, 8 * bytes]
    nb = chunks.shape[1]
    fields = chunks[..., : _GROUP * head].reshape(groups, nb, head // 2, _GROUP, 2).transpose(2, 3)
    quant_bytes = block_bytes - head
    quants = chunks[..., _GROUP * head :].reshape(groups, nb, quant_bytes // run, _GROUP, run).transpose(2, 3)
    quants = quants.reshape(groups, nb, _GROUP, quant_bytes)
    blocks = torch.cat([fields.reshape(groups, nb, _GROUP, head), quants], dim=3)  # [G, nb, 8, bytes]
    return blocks.transpose(1, 2).reshape(groups * _GROUP, row_bytes)


def quant_format(quant_type: str) -> QuantFormat:
    """The registered format called ``quant_type``; ``ValueError`` listing the known ones otherwise."""
    fmt = QUANT_TYPES.get(quant_type)
    if fmt is None:
        raise ValueError(f"quant_type {quant_type!r} is not supported; supported: {', '.join(QUANT_TYPES)}")
    return fmt


class QuantizedLinearWeight:
    """A ``[out_features, in_features]`` weight kept in a GGUF block format; call it like ``F.linear``.

    ``raw`` is ``torch.uint8 [out_features, row_bytes]`` in GGUF's own byte layout (one output
    row's blocks contiguous), e.g. ``torch.from_numpy(reader_tensor.data)``. It is copied, so a
    memory-mapped file can be closed afterwards; only the copy (``nbytes``) stays resident.
    """

    def __init__(self, raw: torch.Tensor, quant_type: str, in_features: int) -> None:
        fmt = quant_format(quant_type)
        if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8:
            got = raw.dtype if isinstance(raw, torch.Tensor) else type(raw).__name__
            raise ValueError(f"raw must be a torch.uint8 tensor of GGUF block bytes, got {got}")
        if raw.dim() != 2:
            raise ValueError(f"raw must be 2-D [out_features, row_bytes], got shape {tuple(raw.shape)}")
        if raw.device.type != "cpu":
            raise ValueError(f"raw must be on the CPU, got device {raw.device}")
        if in_features <= 0 or in_features % fmt.block_elems:
            raise ValueError(
                f"in_features ({in_features}) must be a positive multiple of {quant_type}'s "
                f"block size {fmt.block_elems}"
            )
        if raw.shape[1] != fmt.row_bytes(in_features):
            raise ValueError(
                f"raw has {raw.shape[1]} bytes per row, but {in_features} {quant_type} weights take "
                f"{fmt.row_bytes(in_features)} (in_features / {fmt.block_elems} * {fmt.block_bytes})"
            )
        self.format = fmt
        self.quant_type = quant_type
        self.out_features = raw.shape[0]
        self.in_features = in_features
        self.interleaved = fmt.interleave_head > 0
        # Our own copy, never a view of a caller's mmap (interleave_rows writes a new tensor).
        self.packed = interleave_rows(raw, fmt) if self.interleaved else raw.contiguous().clone()
        # How products treat x: None keeps it fp32; "int8" (use_int8_activations) quantizes it,
        # and ``packed`` is then in the quad layout.
        self.activations: str | None = None
        self._row_gather: torch.Tensor | None = None  # built by the first embedding lookup
        ops = cpu_ops()
        # A kernel build from before the quantized ops existed keeps the torch path.
        self._ops = ops if ops is not None and hasattr(ops, "quant_linear") else None

    @property
    def nbytes(self) -> int:
        """Bytes resident for this weight: the file's bytes, plus up to 7 zero rows of padding for
        interleaved formats whose ``out_features`` is not a multiple of 8."""
        return self.packed.numel()

    def gguf_rows(self) -> torch.Tensor:
        """The weight in GGUF's byte layout, uint8 ``[out_features, row_bytes]`` (a new tensor if interleaved)."""
        if not self.interleaved:
            return self.packed
        return deinterleave_groups(self.packed, self.format, self._run)[: self.out_features]

    @property
    def _run(self) -> int:
        """Quant bytes per row run in ``packed`` (``interleave_rows``): 1, or QUAD_RUN once int8."""
        return QUAD_RUN if self.activations == "int8" else 1

    @property
    def supports_int8_activations(self) -> bool:
        """Whether this format has the int8-activation kernels (Q8_0, Q4_0, Q4_1; not the K-quants)."""
        return self.interleaved

    def use_int8_activations(self) -> None:
        """From now on quantize x to int8 per 32-element block inside each product (integer dot
        products, ``quire/kernels/csrc/quant_a8.cpp``): faster at decode, but no longer the fp32
        product with the dequantized weight (``int8_activation_reference`` gives its exact math).
        Re-lays the bytes out in the quad layout (a permutation, nothing expanded)."""
        if not self.supports_int8_activations:
            raise ValueError(f"{self.quant_type} has no int8-activation kernels (Q8_0, Q4_0 and Q4_1 do)")
        if self.activations == "int8":
            return
        rows = deinterleave_groups(self.packed, self.format, self._run)  # padding rows included
        self.packed = interleave_rows(rows, self.format, QUAD_RUN)
        self.activations, self._row_gather = "int8", None

    def __repr__(self) -> str:
        return f"QuantizedLinearWeight({self.quant_type}, out={self.out_features}, in={self.in_features})"

    def _dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        if self._ops is not None:
            return self._ops.quant_dequantize(rows, self.format.ggml_type, self.in_features)
        blocks = rows.reshape(-1, self.format.block_bytes)
        return self.format.dequantize_blocks(blocks).reshape(rows.shape[0], self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The weight as fp32 ``[out_features, in_features]``, bit-identical to gguf.quants.dequantize."""
        return self._dequantize_rows(self.gguf_rows())

    def _select_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """GGUF bytes of rows ``ids`` (int64 [n]): [n, row_bytes]."""
        if not self.interleaved:
            return self.packed.index_select(0, ids)
        if self._row_gather is None:
            # Where row i of a group keeps its GGUF bytes in the group's interleaved bytes: the
            # inverse layout applied to byte offsets (one small table, [8, row_bytes]).
            offsets = torch.arange(self.packed[:_GROUP].numel(), dtype=torch.int32)
            gather = deinterleave_groups(offsets.view(_GROUP, -1), self.format, self._run)
            self._row_gather = gather.to(torch.int64)
        groups = self.packed.view(-1, self._row_gather.numel()).index_select(0, ids // _GROUP)
        return groups.gather(1, self._row_gather.index_select(0, ids % _GROUP))

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` dequantized (a token embedding lookup): fp32 ``[*ids.shape, in_features]``."""
        flat = ids.reshape(-1).to(torch.int64)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.out_features):
            raise ValueError(f"ids must be in [0, {self.out_features}), got {flat.min()}..{flat.max()}")
        return self._dequantize_rows(self._select_rows(flat)).reshape(*ids.shape, self.in_features)

    @property
    def kernel_type_id(self) -> int:
        """The type id the compiled kernels take for ``packed``: GGML's, flagged by its layout."""
        if self.activations == "int8":
            return self.format.ggml_type + INT8_ACTIVATIONS_FLAG
        return self.format.ggml_type + (INTERLEAVED_FLAG if self.interleaved else 0)

    def fused_decode_operand(self) -> object | None:
        """This weight as an operand of the compiled whole-layer decode kernel (a
        ``LinearOperand`` over the same packed bytes, no copy), or None without the kernels."""
        if self._ops is None or not hasattr(self._ops, "LinearOperand"):
            return None
        return self._ops.LinearOperand.quantized(
            self.packed, self.kernel_type_id, self.in_features, self.out_features
        )

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype != torch.float32 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must be float32 [..., {self.in_features}], got {x.dtype} {tuple(x.shape)}")
        if self._ops is None or x.device.type != "cpu":
            if self.activations == "int8":
                return int8_activation_reference(x, self, bias).to(x.dtype)
            return F.linear(x, self.dequantize().to(x.device), bias)
        rows = x.reshape(-1, self.in_features).contiguous()
        bias = None if bias is None else bias.contiguous()
        type_id = self.kernel_type_id
        padded = self.packed.shape[0]
        if self.interleaved:
            if bias is not None and padded != self.out_features:
                bias = torch.cat(
                    [bias.float(), bias.new_zeros(padded - self.out_features, dtype=torch.float32)]
                )
        y = self._ops.quant_linear(rows, self.packed, type_id, self.in_features, bias)
        if padded != self.out_features:
            y = y[:, : self.out_features].contiguous()
        return y.view(*x.shape[:-1], self.out_features)


def quantize_weight(weight: torch.Tensor, method: str) -> QuantizedLinearWeight:
    """An fp32 ``[out, in]`` weight quantized at load time: ``int8`` -> Q8_0, ``int4`` -> Q4_1
    (blocks of 32 along ``in``), bit-identical to ``gguf.quants.quantize``."""
    quant_type = METHOD_FORMATS.get(method)
    if quant_type is None:
        raise ValueError(
            f"quantization method {method!r} is not supported; supported: {', '.join(QUANTIZATION_METHODS)}"
        )
    fmt = QUANT_TYPES[quant_type]
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"weight must be a 2-D floating-point tensor, got {weight.dtype} {tuple(weight.shape)}"
        )
    out_features, in_features = weight.shape
    if in_features % fmt.block_elems:
        raise ValueError(
            f"weight in_features ({in_features}) must be a multiple of {fmt.block_elems} for {method} ({quant_type})"
        )
    assert fmt.quantize_blocks is not None  # every METHOD_FORMATS target can be produced
    blocks = weight.detach().to(device="cpu", dtype=torch.float32).reshape(-1, fmt.block_elems)
    raw = fmt.quantize_blocks(blocks).reshape(out_features, fmt.row_bytes(in_features))
    return QuantizedLinearWeight(raw, quant_type, in_features)


# --- int8 activations: the kernels' math in torch ---------------------------------------------------


def quantize_activations_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``[rows, k]`` -> (int8-valued fp32 ``[rows, k / 32, 32]``, fp32 scales ``[rows, k / 32]``),
    with the same fp32 operations as the kernels (quant_a8.cpp), so the integers are identical:
    d = max|x| / 127 per block, q = round_half_even(x * (1 / d)) clamped to [-127, 127]."""
    blocks = x.reshape(x.shape[0], -1, 32).to(torch.float32)
    d = blocks.abs().amax(dim=-1) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    return torch.round(blocks * inv.unsqueeze(-1)).clamp(-127, 127), d


def _integer_blocks(
    fmt: QuantFormat, blocks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 [blocks, bytes] of Q8_0 / Q4_0 / Q4_1 -> (integer quants [blocks, 32], d, m) with each
    block's weights = d * q + m (Q4_0's q already minus 8, m = 0)."""
    d = _f16(blocks, 0).squeeze(-1)
    m = torch.zeros_like(d)
    if fmt.name == "Q8_0":
        q = blocks[:, 2:].contiguous().view(torch.int8).to(torch.int32)
    elif fmt.name == "Q4_0":
        q = _nibbles(blocks[:, 2:], 16).to(torch.int32) - 8
    else:
        q = _nibbles(blocks[:, 4:], 16).to(torch.int32)
        m = _f16(blocks, 2).squeeze(-1)
    return q, d, m


def int8_activation_reference(
    x: torch.Tensor, weight: QuantizedLinearWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``weight(x)`` under int8 activations, computed plainly in torch (float64 sums, exact integer
    dots): per 32-block b, d_w * d_x * dot(q_x, q_w) + m_w * d_x * sum(q_x). What the kernels compute
    up to fp32 summation order; also the product where the kernels are missing. fp32 out."""
    if not weight.supports_int8_activations:
        raise ValueError(f"{weight.quant_type} has no int8-activation path")
    rows = x.reshape(-1, weight.in_features)
    qx, dx = quantize_activations_int8(rows.cpu())
    q, d, m = _integer_blocks(weight.format, weight.gguf_rows().reshape(-1, weight.format.block_bytes))
    n, nb = weight.out_features, weight.in_features // 32
    dots = torch.einsum("rbk,nbk->rnb", qx.double(), q.view(n, nb, 32).double())
    y = torch.einsum("rnb,nb,rb->rn", dots, d.view(n, nb).double(), dx.double())
    y = y + torch.einsum("nb,rb->rn", m.view(n, nb).double(), (dx.double() * qx.double().sum(-1)))
    if bias is not None:
        y = y + bias.cpu().double()
    return y.float().view(*x.shape[:-1], n).to(x.device)


def _quantized_weights(method: object) -> list[QuantizedLinearWeight]:
    """The QuantizedLinearWeight(s) behind a linear method: itself, or a stacked method's parts."""
    if isinstance(method, QuantizedLinearWeight):
        return [method]
    return [part for part in getattr(method, "parts", ()) if isinstance(part, QuantizedLinearWeight)]


def apply_quantized_activations(model: torch.nn.Module, mode: str) -> int:
    """The --quantized-activations hook, run once after the weights are loaded (and quantized):
    every Q8_0 / Q4_0 / Q4_1 weight of ``model`` (decoder linears, and a quantized embedding / LM
    head) switches to ``mode`` activations; K-quant weights keep fp32 activations. Returns how many
    weights switched; ``ValueError`` if none can (a dense model: nothing is quantized)."""
    if mode not in QUANTIZED_ACTIVATIONS:
        raise ValueError(
            f"quantized activations {mode!r} are not supported; supported: {', '.join(QUANTIZED_ACTIVATIONS)}"
        )
    switched: set[int] = set()  # ids: a tied LM head shares the embedding's weight
    for module in model.modules():
        for weight in _quantized_weights(getattr(module, "method", None)):
            if weight.supports_int8_activations and id(weight) not in switched:
                weight.use_int8_activations()
                switched.add(id(weight))
    if not switched:
        raise ValueError(
            f"quantized_activations={mode!r} applies to Q8_0/Q4_0/Q4_1 weights, and this model has none: "
            "add --quantization int8 or int4 (safetensors checkpoints), or load a GGUF file with those types"
        )
    return len(switched)
