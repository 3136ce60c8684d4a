"""Int8 activations for quantized weights (``--quantized-activations int8``, quant_a8.cpp).

The kernels quantize each row of x per 32-element block to int8 and take integer dot products
with Q8_0 / Q4_0 / Q4_1 weights. Their reference is the same math written plainly in torch
(``int8_activation_reference``: the same fp32 block quantization, exact integer dots, float64
sums), which they must match to float rounding, on the chosen instruction-set tier and on the
avx2 tier (maddubs, where this CPU's best tier uses VNNI). End to end, a tiny model with the
option generates, and its logits stay close to the fp32 path's.
"""

from __future__ import annotations

import pytest
import torch
from kernel_fixtures import compiled_cpu_ops

from quire.config import EngineArgs, ModelConfig
from quire.kernels.isa import chosen_tier, supported_tiers
from quire.models.demo import build_random_checkpoint
from quire.models.loader import load_model
from quire.models.quant_linear import (
    QUAD_RUN,
    QUANT_TYPES,
    QuantizedLinearWeight,
    apply_quantized_activations,
    deinterleave_groups,
    int8_activation_reference,
    interleave_rows,
    quantize_activations_int8,
)

_FORMATS = ("Q8_0", "Q4_0", "Q4_1")


def _tier_params() -> list[object]:
    """The chosen tier and avx2 (the maddubs kernel, where the chosen one uses VNNI); the portable
    tier's scalar kernel is ``slow`` (another build of about a minute)."""
    names = [tier.name for tier in supported_tiers()]
    wanted = [name for name in dict.fromkeys((chosen_tier().name, "avx2")) if name in names]
    params = [pytest.param(name, id=name) for name in wanted]
    if "portable" not in wanted:
        params.append(pytest.param("portable", id="portable", marks=pytest.mark.slow))
    return params


@pytest.fixture(params=_tier_params())
def ops(request: pytest.FixtureRequest):
    return compiled_cpu_ops(request.param)


def _random_weight(quant_type: str, out_features: int, in_features: int, seed: int) -> QuantizedLinearWeight:
    """Valid random blocks: random quant bytes, f16 scales of either sign and varied magnitude."""
    gen = torch.Generator().manual_seed(seed)
    fmt = QUANT_TYPES[quant_type]
    blocks = torch.randint(
        0, 256, (out_features * in_features // 32, fmt.block_bytes), dtype=torch.uint8, generator=gen
    )
    for offset in range(0, fmt.interleave_head, 2):
        scales = (torch.rand(blocks.shape[0], generator=gen) - 0.5) * 0.02
        blocks[:, offset : offset + 2] = scales.to(torch.float16).view(torch.uint8).view(-1, 2)
    return QuantizedLinearWeight(blocks.reshape(out_features, -1), quant_type, in_features)


def _assert_close(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor) -> None:
    """Within 1e-5 of the size of the terms summed (``scale``: the sum of their magnitudes)."""
    err = ((got.double() - want.double()).abs() / scale.clamp_min(1e-30)).max().item()
    assert err < 1e-5, f"relative error {err:.2e}"


def _term_scale(x: torch.Tensor, weight: QuantizedLinearWeight) -> torch.Tensor:
    return x.double().abs() @ weight.dequantize().double().abs().T + 1e-6


def test_quad_layout_is_a_padded_permutation() -> None:
    for quant_type in _FORMATS:
        fmt = QUANT_TYPES[quant_type]
        raw = torch.randint(0, 256, (13, fmt.row_bytes(96)), dtype=torch.uint8)
        packed = interleave_rows(raw, fmt, QUAD_RUN)
        assert packed.shape == (16, raw.shape[1])
        assert torch.equal(deinterleave_groups(packed, fmt, QUAD_RUN)[:13], raw)
        # Quant byte 4i + t of row r sits at 32i + 4r + t after the 8 rows' header fields.
        head = 8 * fmt.interleave_head
        assert packed.view(-1)[head + 32 + 4 * 3 + 2] == raw[3, fmt.interleave_head + 4 + 2]


def test_activation_quantization_matches_its_definition() -> None:
    x = torch.randn(3, 64) * torch.logspace(-3, 2, 64)
    x[1, :32] = 0.0  # an all-zero block: scale 0, quants 0
    q, d = quantize_activations_int8(x)
    assert q.abs().max() <= 127 and torch.equal(q, q.round())
    assert d[1, 0] == 0 and not q[1, 0].any()
    assert ((q * d.unsqueeze(-1) - x.view(3, 2, 32)).abs() <= d.unsqueeze(-1) / 2 + 1e-12).all()


@pytest.mark.parametrize("quant_type", _FORMATS)
@pytest.mark.parametrize(("rows", "out_features", "in_features"), [(1, 8, 32), (1, 70, 576), (3, 37, 96),
                                                                   (4, 64, 1536), (7, 40, 160), (32, 24, 64)])  # fmt: skip
def test_kernel_equals_the_torch_reference(
    ops, quant_type: str, rows: int, out_features: int, in_features: int
) -> None:
    weight = _random_weight(quant_type, out_features, in_features, seed=rows + out_features)
    weight.use_int8_activations()
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(in_features))
    x[0, :32] *= 100.0  # blocks of very different scales
    bias = torch.randn(out_features)
    want = int8_activation_reference(x, weight, bias)
    packed_bias = torch.cat([bias, bias.new_zeros(weight.packed.shape[0] - out_features)])
    got = ops.quant_linear(x, weight.packed, weight.kernel_type_id, in_features, packed_bias)[
        :, :out_features
    ]
    _assert_close(got, want, _term_scale(x, weight) + bias.abs().double())


def test_kernel_names_its_dot_product(ops) -> None:
    assert ops.quant_a8_kernel() in ("avx512vnni", "avxvnni", "avx2", "portable")


@pytest.mark.parametrize("quant_type", _FORMATS)
def test_weight_object_and_decode_operand(quant_type: str) -> None:
    weight = _random_weight(quant_type, 21, 128, seed=5)
    x = torch.randn(2, 128)
    fp32 = weight(x)
    rows_before = weight.gguf_rows().clone()
    ids = torch.tensor([0, 7, 20])
    lookup_before = weight.embedding(ids)
    weight.use_int8_activations()
    assert torch.equal(weight.gguf_rows(), rows_before) and torch.equal(weight.embedding(ids), lookup_before)
    want = int8_activation_reference(x, weight)
    _assert_close(weight(x), want, _term_scale(x, weight))
    assert (weight(x) - fp32).abs().max() < 0.05 * fp32.abs().max()  # close to, not equal to, fp32
    operand = weight.fused_decode_operand()
    if operand is not None:
        _assert_close(operand(x.contiguous()), want, _term_scale(x, weight))


def test_k_quants_keep_fp32_activations() -> None:
    raw = torch.zeros(4, QUANT_TYPES["Q4_K"].row_bytes(256), dtype=torch.uint8)
    weight = QuantizedLinearWeight(raw, "Q4_K", 256)
    assert not weight.supports_int8_activations
    with pytest.raises(ValueError, match="Q4_K has no int8-activation kernels"):
        weight.use_int8_activations()


def test_option_is_validated() -> None:
    with pytest.raises(ValueError, match="quantized_activations must be one of int8"):
        ModelConfig(model="m", quantized_activations="int4")
    assert EngineArgs(quantized_activations="int8").model_config("m").quantized_activations == "int8"


def test_dense_model_refuses_the_option(tmp_path) -> None:
    path = build_random_checkpoint(tmp_path / "m", "llama")
    with pytest.raises(ValueError, match="applies to Q8_0/Q4_0/Q4_1 weights.*--quantization int8 or int4"):
        load_model(path, torch.float32, "cpu", progress=False, quantized_activations="int8")
    model = load_model(path, torch.float32, "cpu", progress=False)
    with pytest.raises(ValueError, match="not supported"):
        apply_quantized_activations(model, "int4")


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Logits of every position of one sequence, prefilled token by token (each a decode step)."""
    from test_models import PagedBatcher

    from quire.worker.kv_cache import allocate_kv_caches

    batcher = PagedBatcher(num_blocks=16, block_size=16, seed=1)
    caches = allocate_kv_caches(model.config, 16, 16, torch.float32, "cpu")
    out = []
    with torch.inference_mode():
        step_ids, positions, meta, _ = batcher.step([], [(0, ids[:1])])
        out.append(model.compute_logits(model(step_ids, positions, caches, meta))[-1])
        for token in ids[1:]:
            step_ids, positions, meta, _ = batcher.step([(0, token)], [])
            out.append(model.compute_logits(model(step_ids, positions, caches, meta))[-1])
    return torch.stack(out)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_tiny_model_with_int8_activations_stays_close(tmp_path, method: str) -> None:
    """Logits under int8 activations stay near those of the same quantized weights with fp32
    activations: mean difference under 5% of the logits' standard deviation, largest under 25%
    (measured on this random model: ~1.4% and ~8%); the option reaches every quantized matrix."""
    path = build_random_checkpoint(tmp_path / "m", "llama")
    fp32 = load_model(path, torch.float32, "cpu", progress=False, quantization=method)
    a8 = load_model(
        path, torch.float32, "cpu", progress=False, quantization=method, quantized_activations="int8"
    )
    methods = [
        m.method for m in a8.modules() if isinstance(getattr(m, "method", None), QuantizedLinearWeight)
    ]
    assert methods and all(w.activations == "int8" for w in methods)
    ids = torch.randint(0, a8.config.vocab_size, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    want, got = _logits(fp32, ids), _logits(a8, ids)
    spread = want.std().item()
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() < 0.25 * spread, "int8 activations moved the logits too far"
    assert (got - want).abs().mean().item() < 0.05 * spread
