"""Quantize fp32 rows into GGUF's Q4_K, Q5_K and Q6_K block layouts (numpy).

The ``gguf`` package dequantizes every type but quantizes only the simple ones (Q8_0, Q4_0, Q4_1,
F16, BF16), so these make the K-quant files that quire's benchmarks and tests need from a
Hugging Face checkpoint. They use plain min/max (or absmax) scales per sub-block, not llama.cpp's
error-minimising search: the files are valid and decode with ``gguf.quants.dequantize``, at
somewhat higher error than llama.cpp's own quantizer. Layouts are as gguf-py reads them:

- Q4_K (144 bytes / 256 values): f16 d, f16 dmin, 12 bytes of eight 6-bit scales and mins, 128
  bytes of nibbles (byte 32g + i holds sub-block 2g's value i low, 2g+1's high);
  value = d * sc[j] * q - dmin * m[j], q in 0..15.
- Q5_K (176 bytes): as Q4_K plus 32 bytes of high bits (bit j of byte i: sub-block j, value i).
- Q6_K (210 bytes): 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, f16 d;
  value = d * sc[j] * (q - 32) over sixteen sub-blocks of 16, q in 0..63.
"""

from __future__ import annotations

import numpy as np

QK_K = 256


def _blocks(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] % QK_K:
        raise ValueError(f"K-quants need 2-D rows whose length is a multiple of {QK_K}, got {rows.shape}")
    return rows.reshape(-1, QK_K)


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _scale_min_quants(blocks: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Per 32-value sub-block an asymmetric range, its 6-bit scale and min codes against the
    block's f16 super-scales, and the quants in 0..levels."""
    sub = blocks.reshape(len(blocks), 8, 32)
    low = np.minimum(sub.min(axis=-1), 0.0)
    scale = (sub.max(axis=-1) - low) / levels
    minimum = -low
    d = (scale.max(axis=-1) / 63).astype(np.float16).astype(np.float32)
    dmin = (minimum.max(axis=-1) / 63).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, None] > 0, np.rint(scale / d[:, None]), 0).clip(0, 63).astype(np.uint8)
        m = np.where(dmin[:, None] > 0, np.rint(minimum / dmin[:, None]), 0).clip(0, 63).astype(np.uint8)
        step = (d[:, None] * sc)[..., None]
        offset = (dmin[:, None] * m)[..., None]
        q = np.where(step > 0, np.rint((sub + offset) / step), 0).clip(0, levels).astype(np.uint8)
    return d, dmin, sc, m, q


def _pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    packed = np.empty((len(sc), 12), dtype=np.uint8)
    packed[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return packed


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    low = q[:, 0::2, :] & 0x0F  # sub-blocks 0, 2, 4, 6
    high = q[:, 1::2, :] & 0x0F
    return (low | (high << 4)).reshape(len(q), 128)


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    """``[n, k]`` fp32 -> ``[n, k / 256 * 144]`` uint8 Q4_K blocks."""
    blocks = _blocks(rows)
    d, dmin, sc, m, q = _scale_min_quants(blocks, 15)
    out = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales(sc, m), _pack_nibbles(q)], axis=1)
    return out.reshape(np.shape(rows)[0], -1)


def quantize_q5_k(rows: np.ndarray) -> np.ndarray:
    """``[n, k]`` fp32 -> ``[n, k / 256 * 176]`` uint8 Q5_K blocks."""
    blocks = _blocks(rows)
    d, dmin, sc, m, q = _scale_min_quants(blocks, 31)
    high_bits = ((q >> 4) & 1).astype(np.uint8)  # [blocks, 8 sub-blocks, 32]
    qh = np.zeros((len(blocks), 32), dtype=np.uint8)
    for j in range(8):
        qh |= high_bits[:, j, :] << j
    parts = [_f16_bytes(d), _f16_bytes(dmin), _pack_scales(sc, m), qh, _pack_nibbles(q & 0x0F)]
    return np.concatenate(parts, axis=1).reshape(np.shape(rows)[0], -1)


def quantize_q6_k(rows: np.ndarray) -> np.ndarray:
    """``[n, k]`` fp32 -> ``[n, k / 256 * 210]`` uint8 Q6_K blocks."""
    blocks = _blocks(rows)
    sub = blocks.reshape(len(blocks), 16, 16)
    # Signed scale per sub-block: the value of largest magnitude maps to -32, as llama.cpp does.
    extreme = np.take_along_axis(sub, np.abs(sub).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    scale = extreme / -32.0
    d = (np.abs(scale).max(axis=-1) / 127).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, None] > 0, np.rint(scale / d[:, None]), 0).clip(-128, 127).astype(np.int8)
        step = (d[:, None] * sc)[..., None]
        q = (np.where(step != 0, np.rint(sub / step), 0).clip(-32, 31) + 32).astype(np.uint8)
    q = q.reshape(len(blocks), 2, 128)  # two halves of 128 values
    low, high = q & 0x0F, q >> 4
    ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(len(blocks), 128)
    high = high.reshape(len(blocks), 2, 4, 32)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    parts = [ql, qh.reshape(len(blocks), 64), sc.view(np.uint8), _f16_bytes(d)]
    return np.concatenate(parts, axis=1).reshape(np.shape(rows)[0], -1)


QUANTIZERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}
