"""Quantized models on the compiled whole-layer decode path (``decode_layer`` in csrc/decode_layer.cpp).

Each linear method hands the kernel a ``LinearOperand`` (dense panels or GGUF blocks), so int8 /
int4 models and GGUF files take the same one-call-per-layer path as dense ones. The reference is
the same model run layer by layer (``fused_decode_layers = None``): the same GEMM kernels called
from Python, so logits agree to float rounding and greedy tokens are identical.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from gguf_fixtures import write_gguf_checkpoint
from test_models import PagedBatcher, _random_seqs, _run_schedule

from quire.kernels.cpu_ops import cpu_ops
from quire.models.cpu_linear import CpuLinearWeight
from quire.models.demo import build_random_checkpoint
from quire.models.llama import Linear
from quire.models.loader import load_model
from quire.models.quant_linear import QuantizedLinearWeight, quantize_weight
from quire.worker.kv_cache import allocate_kv_caches

# Name -> build_random_checkpoint arguments. "narrow-heads": 32 heads of 2 dims and one KV head,
# so the fused q|k|v projection has 68 rows, not a multiple of the interleaved layout's 8 (its
# padding rows must be cut off, and Qwen2's q|k|v bias added to the real ones only).
_CHECKPOINTS: dict[str, tuple[str, dict[str, object]]] = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),  # q/k/v bias
    "mistral": ("mistral", {"tie_word_embeddings": False, "num_kv_heads": 1}),
    "qwen2-narrow-heads": ("qwen2", {"num_heads": 32, "num_kv_heads": 1, "head_dim": 2}),
    "llama-k": ("llama", {"hidden_size": 256, "intermediate_size": 512, "num_heads": 4, "num_kv_heads": 2}),
}
# (checkpoint, how it is quantized): --quantization methods, and GGUF files in the interleaved
# formats and a K-quant (GGUF's own row layout).
_CASES = [
    ("llama", "int8"),
    ("llama", "int4"),
    ("qwen2", "int4"),
    ("mistral", "int8"),
    ("qwen2-narrow-heads", "int4"),
    ("qwen2-narrow-heads", "int8"),
    ("llama", "gguf:Q4_0"),
    ("qwen2", "gguf:Q8_0"),
    ("llama-k", "gguf:Q4_K"),
]


@pytest.fixture(scope="module")
def ops():
    module = cpu_ops()
    if module is None:
        pytest.skip("the CPU kernels are unavailable")
    return module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            arch, kwargs = _CHECKPOINTS[name]
            built[name] = build_random_checkpoint(tmp_path_factory.mktemp(f"fq-{name}"), arch, **kwargs)
        return built[name]

    return get


def _load_quantized(
    checkpoint: Callable[[str], Path], name: str, how: str, tmp_path: Path
) -> torch.nn.Module:
    if how.startswith("gguf:"):
        path, _ = write_gguf_checkpoint(checkpoint(name), tmp_path / "gguf", how.removeprefix("gguf:"))
        return load_model(path, "auto", "cpu", progress=False)
    return load_model(checkpoint(name), torch.float32, "cpu", progress=False, quantization=how)


def _greedy(model: torch.nn.Module, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy continuations of ``prompts`` decoded as one batch: one prefill step, then ``steps``
    decode-only steps over every sequence (the steps the fused kernel takes)."""
    batcher = PagedBatcher(num_blocks=64, block_size=16, seed=3)
    caches = allocate_kv_caches(model.config, 64, 16, torch.float32, "cpu")
    out: list[list[int]] = [[] for _ in prompts]
    with torch.inference_mode():
        ids, positions, meta, rows = batcher.step([], list(enumerate(prompts)))
        logits = model.compute_logits(model(ids, positions, caches, meta))
        last = {seq: row for row, (seq, pos) in enumerate(rows) if pos == len(prompts[seq]) - 1}
        for seq, row in last.items():
            out[seq].append(int(logits[row].argmax()))
        for _ in range(steps):
            ids, positions, meta, _ = batcher.step([(s, out[s][-1]) for s in range(len(prompts))], [])
            logits = model.compute_logits(model(ids, positions, caches, meta))
            for seq in range(len(prompts)):
                out[seq].append(int(logits[seq].argmax()))
    return out


@pytest.mark.parametrize(("name", "how"), _CASES, ids=[f"{n}-{h}" for n, h in _CASES])
def test_quantized_fused_decode_matches_layer_by_layer(
    ops, checkpoint: Callable[[str], Path], tmp_path: Path, name: str, how: str
) -> None:
    model = _load_quantized(checkpoint, name, how, tmp_path)
    linears = [m for m in model.model.layers.modules() if isinstance(m, Linear)]
    assert linears and all(isinstance(linear.method, QuantizedLinearWeight) for linear in linears)
    plan = model.fused_decode_layers
    assert plan is not None, "a quantized model must take the fused decode path"
    assert {operand.kind for layer in plan for operand in layer.linears} == {"quantized"}

    seqs = _random_seqs(model.config.vocab_size, [9, 15, 21])
    # Six sequences: decode steps of 6 rows take the quantized panel GEMM, not only the 1-4 row path.
    prompts = _random_seqs(model.config.vocab_size, [3, 5, 8, 13, 4, 6], seed=7)
    fused_logits = _run_schedule(model, seqs, block_size=16)
    fused_tokens = _greedy(model, prompts, steps=10)
    fused_one = _greedy(model, prompts[:1], steps=10)
    model.fused_decode_layers = None
    plain_logits = _run_schedule(model, seqs, block_size=16)
    plain_tokens = _greedy(model, prompts, steps=10)
    plain_one = _greedy(model, prompts[:1], steps=10)

    assert fused_logits.keys() == plain_logits.keys()
    for key, logit in fused_logits.items():
        torch.testing.assert_close(logit, plain_logits[key], atol=1e-5, rtol=1e-5)
        assert int(logit.argmax()) == int(plain_logits[key].argmax()), key
    assert fused_tokens == plain_tokens
    assert fused_one == plain_one
    # Random weights give varied tokens, or "identical" would mean little.
    assert len({t for seq in fused_tokens for t in seq}) > 5


def test_mixed_formats_in_one_projection_keep_the_layer_path(
    ops, checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    """A q|k|v projection stacked from two formats (Q4_K_M's Q6_K attn_v) has no single operand;
    the model then runs layer by layer, as before."""
    path, _ = write_gguf_checkpoint(
        checkpoint("llama-k"), tmp_path / "gguf", "Q4_K", type_overrides={"attn_v": "Q6_K"}
    )
    model = load_model(path, "auto", "cpu", progress=False)
    assert model.fused_decode_layers is None


@pytest.mark.parametrize("how", ["int8", "int4"])
@pytest.mark.parametrize("out_features", [37, 64])
def test_linear_operand_equals_the_methods_own_product(ops, how: str, out_features: int) -> None:
    """An operand multiplies exactly as its method does: quantized (with and without padding rows
    and a bias) and dense panels, for 1, 3 and 7 rows of x."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, 96, generator=gen)
    bias = torch.randn(out_features, generator=gen)
    for method in (quantize_weight(weight, how), CpuLinearWeight(weight)):
        operand = method.fused_decode_operand()
        assert (operand.out_features, operand.in_features) == (out_features, 96)
        for rows in (1, 3, 7):
            x = torch.randn(rows, 96, generator=gen)
            for b in (None, bias):
                got = operand(x, b)
                assert got.shape == (rows, out_features) and got.is_contiguous()
                torch.testing.assert_close(got, method(x, b), atol=0, rtol=0)


def test_bad_operands_and_layers_fail_when_built(ops) -> None:
    method = quantize_weight(torch.randn(64, 64), "int8")
    type_id = method.kernel_type_id
    with pytest.raises(RuntimeError, match="raw has"):
        ops.LinearOperand.quantized(method.packed, type_id, 32, 64)  # wrong in_features
    with pytest.raises(RuntimeError, match="out_features rows"):
        ops.LinearOperand.quantized(method.packed, type_id, 64, 40)
    with pytest.raises(RuntimeError, match="unknown quant_type"):
        ops.LinearOperand.quantized(method.packed, 99, 64, 64)

    def operand(out: int, inp: int):
        return quantize_weight(torch.randn(out, inp), "int4").fused_decode_operand()

    norm = torch.ones(64)
    good = [operand(128, 64), operand(64, 64), operand(256, 64), operand(64, 128)]
    ops.DecodeLayerWeights(norm, norm, good, None, 4, 1e-6, 0.25)
    with pytest.raises(RuntimeError, match="twice down's in_features"):
        ops.DecodeLayerWeights(norm, norm, [*good[:3], operand(64, 64)], None, 4, 1e-6, 0.25)
    with pytest.raises(RuntimeError, match=r"qkv_bias must be a contiguous float32 \[128\]"):
        ops.DecodeLayerWeights(norm, norm, good, torch.zeros(64), 4, 1e-6, 0.25)
    with pytest.raises(RuntimeError, match="linears must be"):
        ops.DecodeLayerWeights(norm, norm, good[:3], None, 4, 1e-6, 0.25)
