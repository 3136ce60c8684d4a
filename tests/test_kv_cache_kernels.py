"""The compiled attention kernels over a bf16 KV cache (``--kv-cache-dtype bfloat16``).

Reading bf16 widens each element to fp32 exactly and every sum then runs as over an fp32 cache,
so a bf16 cache must give bit for bit what an fp32 cache holding the same (bf16-rounded) values
gives. Writes of the compiled decode step round to nearest even, like ``tensor.to(bfloat16)``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_models import PagedBatcher, _random_seqs, _run_schedule

from quire.kernels.cpu_ops import cpu_ops
from quire.models.loader import load_model
from quire.worker.attention import CpuPagedAttention


def _ops():
    ops = cpu_ops()
    if ops is None:
        pytest.skip("CPU kernels unavailable")
    return ops


def _rounded_pair(shape: tuple[int, ...], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A bf16 cache and an fp32 cache holding exactly its values."""
    bf16 = torch.randn(shape, generator=gen).to(torch.bfloat16)
    return bf16, bf16.float()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("head_dim", "block_size", "lens"),
    [
        (64, 16, [700]),  # one long context: split into spans, merged
        (128, 16, [40, 300, 9]),
        (64, 16, [1, 17, 300, 64, 5, 250, 129, 16, 2, 80]),  # whole sequences
        (32, 8, [203, 9]),  # no unrolled key kernel
        (16, 4, [61]),  # the per-key path
    ],
)
def test_decode_kernel_reads_bf16_cache_exactly(
    head_dim: int, block_size: int, lens: list[int], threads: int
) -> None:
    ops = _ops()
    gen = torch.Generator().manual_seed(head_dim + len(lens))
    heads, kv_heads = 9, 3
    max_blocks = max(-(-n // block_size) for n in lens)
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    k16, k32 = _rounded_pair((num_blocks, block_size, kv_heads, head_dim), gen)
    v16, v32 = _rounded_pair((num_blocks, block_size, kv_heads, head_dim), gen)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(lens), max_blocks, dtype=torch.long)
    for s, n in enumerate(lens):
        for b in range(-(-n // block_size)):
            tables[s, b] = order.pop()
    q = torch.randn(len(lens), heads, head_dim, generator=gen) * 3
    out16, out32 = torch.empty_like(q), torch.empty_like(q)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ops.paged_decode_attention(out16, q, k16, v16, tables, torch.tensor(lens), head_dim**-0.5)
        ops.paged_decode_attention(out32, q, k32, v32, tables, torch.tensor(lens), head_dim**-0.5)
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(out16, out32)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size"), [(9, 3, 64, 16), (8, 2, 128, 32)])
def test_prefill_kernel_reads_bf16_cache_exactly(
    heads: int, kv_heads: int, head_dim: int, block_size: int
) -> None:
    """Fresh prompts and chunks that continue a cached prefix, beside decodes."""
    ops = _ops()
    gen = torch.Generator().manual_seed(11)
    work = [(30, 1), (0, 17), (0, 70), (5, 12), (16, 33)]  # (cached tokens, new tokens)
    num_blocks = 48
    batcher = PagedBatcher(num_blocks=num_blocks, block_size=block_size, seed=3)
    for seq, (cached, _) in enumerate(work):
        if cached:
            batcher._slots(seq, 0, cached)
            batcher.num_cached[seq] = cached
    decodes = [(s, 0) for s, (cached, n) in enumerate(work) if n == 1 and cached > 0]
    prefills = [(s, [0] * n) for s, (cached, n) in enumerate(work) if not (n == 1 and cached > 0)]
    _, _, meta, _ = batcher.step(decodes, prefills)
    # Every slot filled, the step's own rows included (the backend writes them before attending).
    k16, k32 = _rounded_pair((num_blocks, block_size, kv_heads, head_dim), gen)
    v16, v32 = _rounded_pair((num_blocks, block_size, kv_heads, head_dim), gen)
    total = sum(n for _, n in work)
    q = torch.randn(total, heads, head_dim, generator=gen)
    chunks, tables = meta.prefill_tables
    out16, out32 = torch.zeros_like(q), torch.zeros_like(q)
    ops.paged_prefill_attention(out16, q, k16, v16, chunks, tables, 0.125)
    ops.paged_prefill_attention(out32, q, k32, v32, chunks, tables, 0.125)
    assert torch.equal(out16, out32)


def test_kernels_refuse_mixed_or_other_cache_dtypes() -> None:
    ops = _ops()
    q, out = torch.zeros(1, 2, 16), torch.zeros(1, 2, 16)
    tables, lens = torch.zeros(1, 1, dtype=torch.long), torch.tensor([3])
    k32 = torch.zeros(2, 4, 1, 16)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        ops.paged_decode_attention(out, q, k32, k32.to(torch.bfloat16), tables, lens, 1.0)
    half = k32.half()
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.paged_decode_attention(out, q, half, half, tables, lens, 1.0)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.paged_prefill_attention(out, q, half, half, torch.tensor([[0, 1, 0]]), torch.tensor([[0]]), 1.0)


def test_fused_decode_layer_writes_and_reads_bf16_cache(tiny_model_dir: Callable[[str], Path]) -> None:
    """The compiled whole-layer decode step against the layer-by-layer path, both over bf16
    caches: the same rows written (rounded to nearest even) and the same logits."""
    model = load_model(tiny_model_dir("llama"), torch.float32, "cpu", progress=False)
    _ops()
    assert model.fused_decode_layers is not None
    seqs = _random_seqs(model.config.vocab_size, [9, 15, 21])
    fused = _run_schedule(model, seqs, dtype=torch.bfloat16, block_size=16)
    plan, model.fused_decode_layers = model.fused_decode_layers, None
    try:
        layer_by_layer = _run_schedule(model, seqs, dtype=torch.bfloat16, block_size=16)
    finally:
        model.fused_decode_layers = plan
    assert fused.keys() == layer_by_layer.keys()
    for key, logit in fused.items():
        torch.testing.assert_close(logit, layer_by_layer[key], atol=1e-5, rtol=1e-5)


def test_cpu_backend_stores_rows_rounded_to_nearest_even() -> None:
    """What the Python side stores into a bf16 cache is ``.to(torch.bfloat16)`` of the row, which
    is what the compiled decode step's store_row computes too (c10::BFloat16's rounding)."""
    _ops()
    gen = torch.Generator().manual_seed(2)
    block_size, kv_heads, head_dim = 16, 2, 32
    k_cache = torch.zeros(4, block_size, kv_heads, head_dim, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    batcher = PagedBatcher(num_blocks=4, block_size=block_size, seed=0)
    _, _, meta, _ = batcher.step([], [(0, [0] * 20)])
    q = torch.randn(20, 4, head_dim, generator=gen)
    k = torch.randn(20, kv_heads, head_dim, generator=gen)
    v = torch.randn(20, kv_heads, head_dim, generator=gen)
    CpuPagedAttention().forward(q, k, v, k_cache, v_cache, meta, 0.2)
    flat = k_cache.view(-1, kv_heads, head_dim)
    assert torch.equal(flat[meta.slot_mapping], k.to(torch.bfloat16))
