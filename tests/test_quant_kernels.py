"""Weights kept in GGUF block formats (quire/models/quant_linear.py, csrc/quant_gemm.cpp).

References are gguf-py itself: dequantizing (torch and compiled) must be bit-identical to
``gguf.quants.dequantize`` on random valid blocks and on blocks gguf-py quantized, and
``quantize_weight`` bit-identical to ``gguf.quants.quantize``. Products are checked against the
float64 product with the dequantized weight, on every instruction-set tier this CPU supports
(the chosen tier by default, the others ``slow``: about a minute of compiling each).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kernel_fixtures import compiled_cpu_ops

import quire.models.quant_linear as quant_linear
from quire.kernels import cpu_ops as kernels
from quire.kernels.isa import chosen_tier, supported_tiers
from quire.models.quant_linear import (
    QUANT_TYPES,
    QuantFormat,
    QuantizedLinearWeight,
    deinterleave_groups,
    interleave_rows,
    quantize_weight,
)

# Byte offsets of each format's f16 scales: random bytes there would make inf/NaN or huge scales.
_F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
_GGUF_QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1")


def random_raw(quant_type: str, out_features: int, in_features: int, seed: int = 0) -> np.ndarray:
    """Valid random block bytes: random quants and sub-block scales, f16 scales of magnitude 1e-3..1e-1."""
    fmt = QUANT_TYPES[quant_type]
    rng = np.random.default_rng(seed)
    blocks = out_features * in_features // fmt.block_elems
    raw = rng.integers(0, 256, size=(blocks, fmt.block_bytes), dtype=np.uint8)
    for offset in _F16_FIELDS[quant_type]:
        scale = rng.uniform(1e-3, 1e-1, blocks) * rng.choice([-1.0, 1.0], blocks)
        raw[:, offset : offset + 2] = scale.astype(np.float16).view(np.uint8).reshape(blocks, 2)
    return raw.reshape(out_features, -1)


def gguf_dequantize(raw: np.ndarray, quant_type: str) -> torch.Tensor:
    return torch.from_numpy(
        np.ascontiguousarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[quant_type]))
    )


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype == torch.float32
    mismatched = (got.view(torch.int32) != want.view(torch.int32)).sum().item()
    assert mismatched == 0, f"{mismatched} values differ from gguf-py"


def _tier_params() -> list[object]:
    chosen = chosen_tier().name
    return [
        pytest.param(tier.name, marks=() if tier.name == chosen else pytest.mark.slow, id=tier.name)
        for tier in supported_tiers()
    ]


@pytest.fixture(params=_tier_params())
def ops(request: pytest.FixtureRequest):
    return compiled_cpu_ops(request.param)


def _shapes(quant_type: str) -> list[tuple[int, int]]:
    # Several blocks per row; out_features not a multiple of the 16-column panel or 4-row group.
    return [(37, 96), (70, 576)] if QUANT_TYPES[quant_type].block_elems == 32 else [(37, 512), (21, 768)]


@pytest.mark.parametrize("quant_type", list(QUANT_TYPES))
def test_torch_dequantize_is_bit_identical_to_gguf(quant_type: str) -> None:
    fmt = QUANT_TYPES[quant_type]
    raw = random_raw(quant_type, 24, 4 * fmt.block_elems, seed=1)
    weight = fmt.dequantize_blocks(torch.from_numpy(raw).reshape(-1, fmt.block_bytes)).reshape(24, -1)
    assert_bits_equal(weight, gguf_dequantize(raw, quant_type))


@pytest.mark.parametrize("quant_type", _GGUF_QUANTIZABLE)
def test_dequantize_of_gguf_quantized_blocks(quant_type: str) -> None:
    """Blocks as gguf-py writes them (real scales, zero rows, extreme values), not only random bytes."""
    weight = torch.randn(16, 128, generator=torch.Generator().manual_seed(2)).numpy()
    weight[3] = 0.0
    weight[5, :32] = 1e4
    raw = gguf.quants.quantize(weight, gguf.GGMLQuantizationType[quant_type])
    fmt = QUANT_TYPES[quant_type]
    torch_weight = fmt.dequantize_blocks(torch.from_numpy(raw).reshape(-1, fmt.block_bytes)).reshape(16, 128)
    assert_bits_equal(torch_weight, gguf_dequantize(raw, quant_type))


@pytest.mark.parametrize("quant_type", list(QUANT_TYPES))
def test_compiled_dequantize_is_bit_identical_to_gguf(ops, quant_type: str) -> None:
    fmt = QUANT_TYPES[quant_type]
    for out_features, in_features in _shapes(quant_type):
        raw = random_raw(quant_type, out_features, in_features, seed=out_features)
        got = ops.quant_dequantize(torch.from_numpy(raw), fmt.ggml_type, in_features)
        assert_bits_equal(got, gguf_dequantize(raw, quant_type))


def _check_product(
    ops, quant_type: str, rows: int, out_features: int, in_features: int, with_bias: bool
) -> None:
    fmt = QUANT_TYPES[quant_type]
    raw = torch.from_numpy(random_raw(quant_type, out_features, in_features, seed=rows + out_features))
    weight = gguf_dequantize(raw.numpy(), quant_type).double()
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=gen)
    bias = torch.randn(out_features, generator=gen) if with_bias else None
    got = ops.quant_linear(x, raw, fmt.ggml_type, in_features, bias)
    want = F.linear(x.double(), weight, None if bias is None else bias.double())
    # fp32 sums of in_features terms in another order: bounded relative to the sum of |terms|.
    scale = (x.double().abs() @ weight.abs().T).max().item()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("quant_type", list(QUANT_TYPES))
def test_compiled_product_matches_the_dequantized_weight(ops, quant_type: str) -> None:
    """Rows on both paths (direct up to 4 rows, panels beyond) and across 6-row tiles."""
    for out_features, in_features in _shapes(quant_type):
        for rows in (1, 2, 3, 4, 6, 7, 32, 100):
            _check_product(ops, quant_type, rows, out_features, in_features, with_bias=rows % 2 == 1)


@pytest.mark.parametrize("quant_type", list(QUANT_TYPES))
def test_compiled_product_decodes_exactly(ops, quant_type: str) -> None:
    """One-hot rows of x pick single weights out: both paths (1 row: direct; 6: panels) must
    return them exactly as gguf-py dequantizes them (a decoding slip would not hide in a tolerance)."""
    fmt = QUANT_TYPES[quant_type]
    in_features = 2 * max(fmt.block_elems, 128)
    raw = random_raw(quant_type, 21, in_features, seed=9)
    weight = gguf_dequantize(raw, quant_type)
    for picks in ([in_features - 1], [0, 17, 33, 130, 200, in_features - 2]):
        x = torch.zeros(len(picks), in_features)
        x[torch.arange(len(picks)), torch.tensor(picks)] = 1.0
        got = ops.quant_linear(x, torch.from_numpy(raw), fmt.ggml_type, in_features)
        assert torch.equal(got, weight[:, picks].T.contiguous())


def test_compiled_product_edge_shapes(ops) -> None:
    # Fewer output rows than a panel or a column group; a single block; no rows of x.
    for quant_type in ("Q4_1", "Q8_0", "Q6_K"):
        block = QUANT_TYPES[quant_type].block_elems
        for out_features in (1, 3, 17):
            for rows in (1, 5, 9):
                _check_product(ops, quant_type, rows, out_features, block, with_bias=True)
    raw = torch.from_numpy(random_raw("Q4_1", 5, 64))
    assert ops.quant_linear(torch.empty(0, 64), raw, 3, 64).shape == (0, 5)


_INTERLEAVED = tuple(name for name, fmt in QUANT_TYPES.items() if fmt.interleave_head)


def test_interleaved_formats() -> None:
    # The compiled kernels' interleave_head_bytes (quant_blocks.h) must agree.
    assert {name: QUANT_TYPES[name].interleave_head for name in _INTERLEAVED} == {
        "Q4_0": 2,
        "Q4_1": 4,
        "Q8_0": 2,
    }


@pytest.mark.parametrize("quant_type", _INTERLEAVED)
def test_interleaved_layout_is_a_padded_permutation(quant_type: str) -> None:
    fmt = QUANT_TYPES[quant_type]
    raw = torch.from_numpy(random_raw(quant_type, 13, 96, seed=3))
    packed = interleave_rows(raw, fmt)
    assert packed.shape == (16, raw.shape[1])  # padded to whole groups of 8 rows
    assert torch.equal(packed.sum(dtype=torch.int64), raw.sum(dtype=torch.int64))  # padding is zeros
    assert torch.equal(deinterleave_groups(packed, fmt)[:13], raw)
    assert not deinterleave_groups(packed, fmt)[13:].any()
    # Group 0, block 1: row r's first f16 field at 2r; quant byte j of row r at 8 * head + 8j + r.
    chunk = packed.reshape(2, -1)[0, 8 * fmt.block_bytes : 16 * fmt.block_bytes]
    block = raw[:8, fmt.block_bytes : 2 * fmt.block_bytes]
    assert torch.equal(chunk[:16].view(8, 2), block[:, :2])
    assert torch.equal(chunk[8 * fmt.interleave_head :].view(-1, 8), block[:, fmt.interleave_head :].T)


def _check_interleaved_product(ops, quant_type: str, rows: int, out_features: int, in_features: int) -> None:
    fmt = QUANT_TYPES[quant_type]
    raw = torch.from_numpy(random_raw(quant_type, out_features, in_features, seed=rows + out_features))
    packed = interleave_rows(raw, fmt)
    weight = gguf_dequantize(raw.numpy(), quant_type).double()
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=gen)
    bias = torch.randn(packed.shape[0], generator=gen)
    got = ops.quant_linear(x, packed, fmt.ggml_type + quant_linear.INTERLEAVED_FLAG, in_features, bias)
    assert got.shape == (rows, packed.shape[0])
    want = F.linear(x.double(), weight, bias[:out_features].double())
    scale = (x.double().abs() @ weight.abs().T).max().item()
    torch.testing.assert_close(got[:, :out_features].double(), want, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(
        got[:, out_features:], bias[out_features:].expand(rows, -1)
    )  # zero padding rows


@pytest.mark.parametrize("quant_type", _INTERLEAVED)
def test_compiled_interleaved_product_matches_the_dequantized_weight(ops, quant_type: str) -> None:
    """1-4 rows (the interleaved direct kernel), more (panels filled from the interleaved layout),
    out_features a multiple of 8 but not of the 16-column panel, and with padding."""
    for out_features, in_features in ((8, 32), (13, 96), (24, 576), (70, 160)):
        for rows in (1, 2, 3, 4, 5, 7, 32):
            _check_interleaved_product(ops, quant_type, rows, out_features, in_features)


@pytest.mark.parametrize("quant_type", _INTERLEAVED)
def test_compiled_interleaved_product_decodes_exactly(ops, quant_type: str) -> None:
    fmt = QUANT_TYPES[quant_type]
    raw = random_raw(quant_type, 21, 256, seed=10)
    packed = interleave_rows(torch.from_numpy(raw), fmt)
    weight = gguf_dequantize(raw, quant_type)
    for picks in ([255], [0, 17], [33, 130, 200], [1, 16, 31, 254], [0, 17, 33, 130, 200, 254]):
        x = torch.zeros(len(picks), 256)
        x[torch.arange(len(picks)), torch.tensor(picks)] = 1.0
        got = ops.quant_linear(x, packed, fmt.ggml_type + quant_linear.INTERLEAVED_FLAG, 256)
        assert torch.equal(got[:, :21], weight[:, picks].T.contiguous())


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
@pytest.mark.parametrize("quant_type", _INTERLEAVED)
def test_interleaved_weight_object(quant_type: str, compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not compiled:
        monkeypatch.setattr(quant_linear, "cpu_ops", lambda: None)
    elif kernels.cpu_ops() is None:
        pytest.skip("no compiled CPU kernels here")
    raw = torch.from_numpy(random_raw(quant_type, 13, 128, seed=11))
    weight = QuantizedLinearWeight(raw, quant_type, 128)
    assert weight.interleaved and (weight._ops is not None) == compiled
    assert weight.nbytes == 16 * raw.shape[1]  # 13 rows padded to 16
    assert torch.equal(weight.gguf_rows(), raw)
    dense = weight.dequantize()
    assert_bits_equal(dense, gguf_dequantize(raw.numpy(), quant_type))
    ids = torch.tensor([[12, 0, 7], [8, 12, 5]])
    assert_bits_equal(weight.embedding(ids), dense[ids])
    gen = torch.Generator().manual_seed(12)
    bias = torch.randn(13, generator=gen)
    for rows in (1, 2, 3, 4, 9):
        x = torch.randn(rows, 128, generator=gen)
        got = weight(x, bias)
        assert got.shape == (rows, 13) and got.is_contiguous()
        want = F.linear(x.double(), dense.double(), bias.double())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_compiled_ops_reject_what_they_cannot_compute(ops) -> None:
    raw = torch.from_numpy(random_raw("Q4_1", 8, 64))
    with pytest.raises(RuntimeError, match="unknown quant_type"):
        ops.quant_linear(torch.ones(2, 64), raw, 99, 64)
    with pytest.raises(RuntimeError, match="bytes per row"):
        ops.quant_linear(torch.ones(2, 64), raw, 8, 64)  # Q8_0 rows are 68 bytes
    with pytest.raises(RuntimeError, match="features"):
        ops.quant_linear(torch.ones(2, 32), raw, 3, 64)
    with pytest.raises(RuntimeError, match="bias"):
        ops.quant_linear(torch.ones(2, 64), raw, 3, 64, torch.ones(7))
    with pytest.raises(RuntimeError, match="multiple of 8 rows"):
        ops.quant_linear(torch.ones(2, 64), raw[:5], 3 + quant_linear.INTERLEAVED_FLAG, 64)
    with pytest.raises(RuntimeError, match="no interleaved layout"):
        ops.quant_linear(torch.ones(2, 256), torch.zeros(8, 144, dtype=torch.uint8), 12 + 256, 256)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
def test_weight_object_calls_like_f_linear(compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not compiled:
        monkeypatch.setattr(quant_linear, "cpu_ops", lambda: None)
    elif kernels.cpu_ops() is None:
        pytest.skip("no compiled CPU kernels here")
    raw = torch.from_numpy(random_raw("Q4_K", 40, 512, seed=5))
    weight = QuantizedLinearWeight(raw, "Q4_K", 512)
    assert (weight._ops is not None) == compiled
    dense = weight.dequantize()
    assert_bits_equal(dense, gguf_dequantize(raw.numpy(), "Q4_K"))
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 1024, generator=gen)[..., ::2]  # 3-D and not contiguous
    bias = torch.randn(40, generator=gen)
    got = weight(x, bias)
    assert got.shape == (2, 3, 40)
    torch.testing.assert_close(got, F.linear(x, dense, bias), rtol=1e-5, atol=1e-5)
    ids = torch.tensor([[3, 0], [39, 3]])
    assert_bits_equal(weight.embedding(ids), dense[ids])
    assert weight.nbytes == raw.numel() == 40 * 2 * 144
    raw.zero_()  # the weight keeps its own copy of the bytes
    assert_bits_equal(weight.dequantize(), dense)


@pytest.mark.parametrize(("method", "quant_type"), [("int8", "Q8_0"), ("int4", "Q4_1")])
def test_quantize_weight_is_bit_identical_to_gguf(method: str, quant_type: str) -> None:
    weight = torch.randn(48, 192, generator=torch.Generator().manual_seed(7)) * 0.05
    weight[1] = 0.0  # scale 0: gguf-py writes zero quants
    weight[2, :32] = torch.linspace(-3.0, 3.0, 32)  # values landing on .5 before rounding
    quantized = quantize_weight(weight, method)
    assert quantized.quant_type == quant_type and quantized.in_features == 192
    want = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType[quant_type])
    assert np.array_equal(quantized.gguf_rows().numpy(), want)
    assert quantized.nbytes == want.nbytes


def test_quantize_weight_error_bounds() -> None:
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(8)) * 0.02 + 0.01
    blocks = weight.reshape(-1, 32)
    for method, step in (
        ("int8", blocks.abs().amax(1) / 127),
        ("int4", (blocks.amax(1) - blocks.amin(1)) / 15),
    ):
        error = (quantize_weight(weight, method).dequantize() - weight).reshape(-1, 32).abs().amax(1)
        # Half a quantization step, plus the f16 rounding of the scale (and of Q4_1's min).
        slack = step * 16 * 2**-11 + blocks.abs().amax(1) * 2**-10
        assert bool((error <= step / 2 + slack).all()), method
    # Q4_1's offset buys accuracy on rows not centred on zero (here a mean of half the std: ~20%
    # lower mean error than Q4_0, for 5.0 instead of 4.5 bits per weight).
    q4_0 = gguf.quants.dequantize(
        gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType.Q4_0), gguf.GGMLQuantizationType.Q4_0
    )
    q4_0_error = (torch.from_numpy(q4_0) - weight).abs().mean()
    q4_1_error = (quantize_weight(weight, "int4").dequantize() - weight).abs().mean()
    assert q4_1_error < 0.9 * q4_0_error


def test_validation_names_the_bad_field() -> None:
    raw = torch.zeros(4, 40, dtype=torch.uint8)  # 64 Q4_1 weights per row
    with pytest.raises(ValueError, match="quant_type 'Q3_K'.*supported: Q4_0"):
        QuantizedLinearWeight(raw, "Q3_K", 64)
    with pytest.raises(ValueError, match="raw must be a torch.uint8"):
        QuantizedLinearWeight(raw.float(), "Q4_1", 64)
    with pytest.raises(ValueError, match="raw must be 2-D"):
        QuantizedLinearWeight(raw.reshape(-1), "Q4_1", 64)
    with pytest.raises(
        ValueError, match="in_features .48. must be a positive multiple of Q4_1's block size 32"
    ):
        QuantizedLinearWeight(raw, "Q4_1", 48)
    with pytest.raises(ValueError, match="raw has 40 bytes per row, but 96 Q4_1 weights take 60"):
        QuantizedLinearWeight(raw, "Q4_1", 96)
    weight = QuantizedLinearWeight(raw, "Q4_1", 64)
    with pytest.raises(ValueError, match="x must be float32"):
        weight(torch.zeros(2, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x must be float32 \[..., 64\]"):
        weight(torch.zeros(2, 32))
    with pytest.raises(ValueError, match=r"ids must be in \[0, 4\)"):
        weight.embedding(torch.tensor([4]))
    with pytest.raises(ValueError, match="quantization method 'int2'"):
        quantize_weight(torch.zeros(4, 64), "int2")
    with pytest.raises(ValueError, match="in_features .40. must be a multiple of 32"):
        quantize_weight(torch.zeros(4, 40), "int8")
    with pytest.raises(ValueError, match="weight must be a 2-D"):
        quantize_weight(torch.zeros(64), "int4")
    with pytest.raises(ValueError, match="block_elems"):
        QuantFormat("X", 1, 20, 4, QUANT_TYPES["Q4_1"].dequantize_blocks)
