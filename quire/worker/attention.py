"""Paged attention backends behind one interface, chosen through a small registry.

Contract for one layer of one step (see ``AttentionMetadata`` for the token layout):

1. write the step's new K/V into the paged cache at ``meta.slot_mapping``;
2. attend: the first ``meta.num_decodes`` tokens are single-token decodes that see their whole
   cached context; each ``PrefillChunk`` is causal, query ``i`` seeing keys ``0 .. num_computed + i``.

Caches are ``[num_blocks, block_size, num_kv_heads, head_dim]``; a flat slot is
``block_id * block_size + offset``. Backends must never hold per-step state: the same instance
serves every layer.

A cache may be narrower than q (``--kv-cache-dtype bfloat16`` under fp32 compute): new K/V are
rounded to the cache dtype when stored, and every path attends over exactly the values the cache
holds, read back in q's dtype, so a token's output does not depend on which path computed it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import MappingProxyType, ModuleType
from typing import ClassVar

import torch
import torch.nn.functional as F

from quire.kernels.cpu_ops import cpu_ops
from quire.worker.attention_metadata import AttentionMetadata, PrefillChunk

# Cache dtypes the compiled kernels (paged decode/prefill attention, and the fused decode_layer in
# quire.models.llama) take, always with fp32 q/out: they widen bf16 exactly on reading and write
# new rows rounded to nearest even, as ``tensor.to(torch.bfloat16)`` does
# (csrc/kv_cache_element.h). Other cache dtypes take the torch paths.
KERNEL_KV_CACHE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)


def kernels_take_kv_cache(dtype: torch.dtype) -> bool:
    """Whether the compiled attention kernels read and write a KV cache of ``dtype``."""
    return dtype in KERNEL_KV_CACHE_DTYPES


class AttentionBackend(ABC):
    """One layer's paged attention for a mixed batch of decodes and prefill chunks."""

    name: ClassVar[str]

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """Store ``k``/``v`` in the caches, then attend; returns one output row per query token."""


class TorchPagedAttention(AttentionBackend):
    """Pure-torch backend: correct on any device, tuned for CPU.

    Everything goes through ``scaled_dot_product_attention``, which accumulates in fp32 for
    bf16/fp16 inputs and uses a fused kernel on CPU. Grouped-query attention never copies K/V per
    query head: decodes fold the query group into SDPA's query-length axis, prefills broadcast K/V
    over the group with a stride-0 ``expand`` (measured faster on CPU than ``enable_gqa`` or
    ``repeat_interleave``).
    """

    name = "torch"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        _store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        parts: list[torch.Tensor] = []
        num_decodes = meta.num_decodes
        if num_decodes:
            parts.append(self._decode(q[:num_decodes], k_cache, v_cache, meta, scale))
        for chunk in meta.prefills:
            rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
            if chunk.num_computed == 0:
                # The whole context is this chunk: use its own K/V, no cache read, but rounded as
                # the cache holds them, so later steps (which read the cache) see the same values.
                keys = _as_stored(k[rows], k_cache.dtype)
                values = _as_stored(v[rows], v_cache.dtype)
                parts.append(_causal_attention(q[rows], keys, values, scale, offset=0))
            else:
                keys, values = _gather_context(k_cache, v_cache, chunk)
                keys, values = keys.to(q.dtype), values.to(q.dtype)
                parts.append(_causal_attention(q[rows], keys, values, scale, offset=chunk.num_computed))
        assert sum(p.shape[0] for p in parts) == q.shape[0], "metadata does not cover every query token"
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @staticmethod
    def _decode(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """All decodes in one SDPA call over their block tables, padding masked by length."""
        num_seqs, num_heads, head_dim = q.shape
        num_blocks, block_size, num_kv_heads, _ = k_cache.shape
        group = num_heads // num_kv_heads
        block_tables = meta.decode_block_tables
        ctx_len = block_tables.shape[1] * block_size
        flat_ids = block_tables.reshape(-1)
        # index_select on a 2-D view is several times faster on CPU than advanced indexing.
        keys = k_cache.view(num_blocks, -1).index_select(0, flat_ids)
        values = v_cache.view(num_blocks, -1).index_select(0, flat_ids)
        # A narrower cache (bf16) widens to q's dtype after the gather: only the rows read convert.
        keys = keys.view(num_seqs, ctx_len, num_kv_heads, head_dim).transpose(1, 2).to(q.dtype)
        values = values.view(num_seqs, ctx_len, num_kv_heads, head_dim).transpose(1, 2).to(q.dtype)
        # Padding slots past each sequence's length (including padded block ids) are masked out.
        visible = torch.arange(ctx_len, device=q.device) < meta.decode_seq_lens.unsqueeze(1)
        # [B, kv_heads, group, D]: the `group` query heads sharing one KV head ride in SDPA's
        # query-length axis, so no K/V copy per query head is needed.
        out = F.scaled_dot_product_attention(
            q.reshape(num_seqs, num_kv_heads, group, head_dim),
            keys,
            values,
            attn_mask=visible[:, None, None, :],
            scale=scale,
        )
        return out.view(num_seqs, num_heads, head_dim)


class CpuPagedAttention(TorchPagedAttention):
    """The torch backend with both attention kinds done by compiled kernels that read the paged
    cache in place (``quire/kernels/csrc/cpu_ops.cpp``).

    Decodes: the gather in ``TorchPagedAttention._decode`` copies every decoding sequence's whole
    context per layer per step, which was about a quarter of a 64-sequence decode step on CPU; the
    kernel reads each cached row once. Prefill chunks: one call for all chunks of the step instead
    of an SDPA call per chunk (plus a context gather and a mask for chunks that continue a cached
    prefix). It covers fp32 queries over caches of ``KERNEL_KV_CACHE_DTYPES`` whose blocks hold a
    multiple of 16 tokens; other dtypes, other block sizes, and machines where the kernels cannot
    be built use the inherited torch path.
    """

    name = "cpu"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        ops = cpu_ops()
        # The prefill kernel scores keys 16 at a time within a block and reads q rows in place.
        if (
            not _kernels_apply(ops, q, k_cache)
            or k_cache.shape[1] % 16 != 0
            or q.stride(2) != 1
            or q.stride(1) != q.shape[2]
        ):
            return super().forward(q, k, v, k_cache, v_cache, meta, scale)
        _store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        num_decodes = meta.num_decodes
        if num_decodes:
            _decode_into(ops, out[:num_decodes], q[:num_decodes], k_cache, v_cache, meta, scale)
        if meta.prefills:
            chunks, tables = meta.prefill_tables
            ops.paged_prefill_attention(out, q, k_cache, v_cache, chunks, tables, scale)
        return out

    @staticmethod
    def _decode(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        ops = cpu_ops()
        if not _kernels_apply(ops, q, k_cache):
            return TorchPagedAttention._decode(q, k_cache, v_cache, meta, scale)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        _decode_into(ops, out, q, k_cache, v_cache, meta, scale)
        return out


def _kernels_apply(ops: ModuleType | None, q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """The compiled attention kernels cover fp32 queries over fp32 or bf16 caches on CPU."""
    return (
        ops is not None
        and q.device.type == "cpu"
        and q.dtype == torch.float32
        and kernels_take_kv_cache(k_cache.dtype)
    )


def _decode_into(
    ops: ModuleType,
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> None:
    """The decode kernel over the first ``meta.num_decodes`` tokens, into contiguous ``out``."""
    ops.paged_decode_attention(
        out, q.contiguous(), k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, scale
    )


def _store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Each new token's K/V row into its flat cache slot, rounded to the cache dtype (round to
    nearest even for bf16, as the compiled kernels round too)."""
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    # Caches are allocated contiguous (kv_cache.allocate_kv_caches); view() relies on it.
    k_rows = k_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    v_rows = v_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    k_rows.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_rows.index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _as_stored(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a cache of ``cache_dtype`` holds it, in ``x``'s own dtype (a no-op when equal)."""
    return x if x.dtype == cache_dtype else x.to(cache_dtype).to(x.dtype)


def _gather_context(
    k_cache: torch.Tensor, v_cache: torch.Tensor, chunk: PrefillChunk
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``num_computed + query_len`` cached K/V rows of one sequence, in order, in the
    cache's dtype (callers convert to q's)."""
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    ctx_len = chunk.num_computed + chunk.query_len
    ids = chunk.block_ids
    keys = k_cache.view(num_blocks, -1).index_select(0, ids).view(-1, num_kv_heads, head_dim)
    values = v_cache.view(num_blocks, -1).index_select(0, ids).view(-1, num_kv_heads, head_dim)
    return keys[:ctx_len], values[:ctx_len]


def _causal_attention(
    q: torch.Tensor,  # [n, heads, D]
    keys: torch.Tensor,  # [offset + n, kv_heads, D]
    values: torch.Tensor,
    scale: float,
    offset: int,
) -> torch.Tensor:
    """Causal attention for one sequence whose first query sits at absolute position ``offset``."""
    n, num_heads, head_dim = q.shape
    ctx_len, num_kv_heads, _ = keys.shape
    group = num_heads // num_kv_heads
    # [kv_heads, group, n, D] queries against K/V broadcast over the group (stride 0, no copy).
    q4 = q.reshape(n, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    k4 = keys.transpose(0, 1).unsqueeze(1).expand(num_kv_heads, group, ctx_len, head_dim)
    v4 = values.transpose(0, 1).unsqueeze(1).expand(num_kv_heads, group, ctx_len, head_dim)
    if offset == 0:
        out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale)
    else:
        # Query i (absolute position offset + i) sees keys 0 .. offset + i.
        query_pos = torch.arange(offset, offset + n, device=q.device)
        key_pos = torch.arange(ctx_len, device=q.device)
        mask = key_pos.unsqueeze(0) <= query_pos.unsqueeze(1)
        out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=scale)
    return out.permute(2, 0, 1, 3).reshape(n, num_heads, head_dim)


# Backend name -> class. Read-only: a new backend (e.g. a CUDA paged kernel) is added here.
_BACKENDS: MappingProxyType[str, type[AttentionBackend]] = MappingProxyType(
    {TorchPagedAttention.name: TorchPagedAttention, CpuPagedAttention.name: CpuPagedAttention}
)
# Device type -> default backend name.
_DEVICE_DEFAULTS: MappingProxyType[str, str] = MappingProxyType({"cpu": "cpu", "cuda": "torch"})


def get_attention_backend(name_or_device: str | torch.device) -> AttentionBackend:
    """A backend by name (``"torch"``) or the default for a device (``"cpu"``, ``"cuda:0"``)."""
    if isinstance(name_or_device, str) and name_or_device in _BACKENDS:
        return _BACKENDS[name_or_device]()
    try:
        device = torch.device(name_or_device)
    except (RuntimeError, TypeError):
        device = None
    if device is not None and device.type in _DEVICE_DEFAULTS:
        return _BACKENDS[_DEVICE_DEFAULTS[device.type]]()
    raise ValueError(
        f"unknown attention backend or device {name_or_device!r}; backends: {', '.join(_BACKENDS)}; "
        f"devices with a default backend: {', '.join(_DEVICE_DEFAULTS)}"
    )
