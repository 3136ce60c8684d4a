"""GGUF files and weight-only quantization: logits against transformers, memory, errors.

Every GGUF test file is written from a tiny random Hugging Face checkpoint by
``gguf_fixtures.write_gguf_checkpoint`` (llama.cpp's tensor names, metadata and q/k row
interleaving), next to a reference checkpoint holding the values the file decodes to; quire's
model loaded from the GGUF file must match transformers run on that reference.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
from conftest import TINY_MODEL_VARIANTS
from gguf_fixtures import write_gguf_checkpoint
from safetensors.torch import load_file, save_file
from test_engine_parity import hf_greedy
from test_models import PARITY_ATOL, _random_seqs, _reference_logits, _run_schedule

from quire.config import ModelConfig
from quire.entrypoints.cli import engine_args_from, parse_args
from quire.entrypoints.llm import LLM
from quire.models.demo import build_random_checkpoint
from quire.models.gguf.stacked import StackedLinearWeight
from quire.models.llama import Linear
from quire.models.loader import load_model, read_arch_config
from quire.models.quant_linear import QuantizedLinearWeight
from quire.sampling import SamplingParams

# K-quant blocks hold 256 weights, so their models need in_features divisible by 256.
_K_SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_heads": 4, "num_kv_heads": 2}
CHECKPOINTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),  # tied embeddings, GQA 4/2
    "llama-untied-bias": ("llama", {"tie_word_embeddings": False, "attention_bias": True}),
    "llama-linear": ("llama", {"rope_scaling": {"type": "linear", "factor": 2.0}}),
    "llama-llama3": ("llama", TINY_MODEL_VARIANTS["llama-llama3"]),  # GGUF: a rope_freqs tensor
    "qwen2": ("qwen2", {"rope_theta": 1000000.0}),  # q/k/v biases
    "qwen3": ("qwen3", {"head_dim": 32}),  # q/k norms
    "llama-k": ("llama", _K_SHAPE),
    "llama-k-untied": ("llama", {**_K_SHAPE, "tie_word_embeddings": False}),
    "qwen2-k": ("qwen2", _K_SHAPE),
}
# (checkpoint, type of every matrix): every supported type on llama, and the other variants.
CASES = [
    *[("llama", t) for t in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")],
    *[("llama-k", t) for t in ("Q4_K", "Q5_K", "Q6_K")],
    ("llama-untied-bias", "Q8_0"),
    ("llama-linear", "Q4_1"),
    ("llama-llama3", "Q8_0"),
    ("qwen2", "Q4_0"),
    ("qwen2", "F16"),
    ("qwen3", "Q8_0"),
    ("llama-k-untied", "Q4_K"),
    ("qwen2-k", "Q6_K"),
]


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            arch, kwargs = CHECKPOINTS[name]
            built[name] = build_random_checkpoint(tmp_path_factory.mktemp(f"hf-{name}"), arch, **kwargs)
        return built[name]

    return get


@pytest.fixture(scope="module")
def gguf_checkpoint(
    hf_checkpoint: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., tuple[Path, Path]]:
    """``gguf_checkpoint("llama", "Q4_1", **options)`` -> (gguf file, reference directory)."""

    def get(name: str, weight_type: str, **options: Any) -> tuple[Path, Path]:
        out = tmp_path_factory.mktemp(f"gguf-{name}-{weight_type}")
        return write_gguf_checkpoint(hf_checkpoint(name), out, weight_type, **options)

    return get


def _load(path: Path, **kwargs: Any) -> torch.nn.Module:
    return load_model(path, "auto", "cpu", progress=False, **kwargs)


def _assert_matches_reference(model: torch.nn.Module, reference_dir: Path, label: str) -> None:
    seqs = _random_seqs(model.config.vocab_size, [9, 15, 21])
    reference = _reference_logits(reference_dir, seqs)
    ours = _run_schedule(model, seqs, block_size=16)
    assert len(ours) == sum(len(s) for s in seqs)
    worst = max((logit - reference[s][p]).abs().max().item() for (s, p), logit in ours.items())
    assert worst <= PARITY_ATOL, f"{label}: max |logit diff| {worst:.2e} vs transformers"
    mismatched = [key for key, logit in ours.items() if logit.argmax() != reference[key[0]][key[1]].argmax()]
    assert not mismatched, f"{label}: greedy token differs at (seq, position) {mismatched[:5]}"
    assert reference[0].std().item() > 0.5  # logits that are not flat, or the check means little


def _linears(model: torch.nn.Module) -> list[Linear]:
    return [module for module in model.modules() if isinstance(module, Linear)]


# ---------------------------------------------------------------------------------------------
# parity with transformers on the dequantized reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("checkpoint", "weight_type"), CASES, ids=[f"{c}-{t}" for c, t in CASES])
def test_gguf_logits_match_transformers(gguf_checkpoint, checkpoint: str, weight_type: str) -> None:
    path, reference = gguf_checkpoint(checkpoint, weight_type)
    model = _load(path)
    quantized = weight_type not in ("F32", "F16", "BF16")
    for linear in _linears(model):
        assert isinstance(linear.method, QuantizedLinearWeight) == quantized, linear
        if quantized:
            assert linear.method.quant_type == weight_type
    _assert_matches_reference(model, reference, f"{checkpoint}/{weight_type}")


def test_mixed_types_like_q4_k_m(gguf_checkpoint) -> None:
    """attn_v and ffn_down in Q6_K beside Q4_K matrices (llama.cpp's Q4_K_M recipe) and a Q8_0
    embedding: the fused q|k|v projection keeps both formats side by side."""
    path, reference = gguf_checkpoint(
        "llama-k", "Q4_K", embed_type="Q8_0", type_overrides={"attn_v": "Q6_K", "ffn_down": "Q6_K"}
    )
    model = _load(path)
    qkv = model.model.layers[0].self_attn.qkv_proj.method
    assert isinstance(qkv, StackedLinearWeight)
    assert [part.quant_type for part in qkv.parts] == ["Q4_K", "Q6_K"]
    assert model.model.layers[0].mlp.down_proj.method.quant_type == "Q6_K"
    assert model.model.embed_tokens.method.quant_type == "Q8_0"
    _assert_matches_reference(model, reference, "Q4_K_M-like")


def test_dense_embedding_beside_quantized_linears(gguf_checkpoint) -> None:
    path, reference = gguf_checkpoint("llama", "Q4_1", embed_type="F16")
    model = _load(path)
    assert model.model.embed_tokens.method is None
    assert model.model.embed_tokens.weight.shape == (512, 64)  # dense, for lookups
    assert not isinstance(model.cpu_lm_head, QuantizedLinearWeight)
    _assert_matches_reference(model, reference, "F16 embedding + Q4_1")


def test_dense_gguf_uses_the_fused_decode_kernel(gguf_checkpoint) -> None:
    """An all-F32 file takes the same fast paths as a safetensors checkpoint, and a quantized one
    the same compiled whole-layer decode call (its linears are quantized operands of it)."""
    dense = _load(gguf_checkpoint("llama", "F32")[0])
    quantized = _load(gguf_checkpoint("llama", "Q8_0")[0])
    if dense.cpu_lm_head is None:
        pytest.skip("the CPU kernels are unavailable")
    assert dense.fused_decode_layers is not None
    assert quantized.fused_decode_layers is not None


def test_greedy_generation_through_llm(gguf_checkpoint) -> None:
    """The whole engine on a GGUF file (tokenizer and all, from the file) against transformers'
    greedy ``generate`` on the reference."""
    path, reference = gguf_checkpoint("qwen2", "Q4_1")
    prompts = [_random_seqs(512, [n], seed=n)[0] for n in (5, 12, 30)]
    expected = hf_greedy(reference, prompts, 12)
    llm = LLM(str(path), max_model_len=128, show_progress=False)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert [r.outputs[0].token_ids for r in results] == expected


# ---------------------------------------------------------------------------------------------
# memory: the quantized bytes are the only copy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpoint", ["llama", "llama-untied-bias"])
def test_quantized_weights_stay_packed(gguf_checkpoint, checkpoint: str) -> None:
    path, _ = gguf_checkpoint(checkpoint, "Q4_1", embed_type="Q8_0")
    model = _load(path)
    file_bytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if t.tensor_type not in (0, 1, 30))
    matrices = [*_linears(model), model.model.embed_tokens]
    if model.lm_head is not None:
        matrices.append(model.lm_head)
    assert all(m.weight.numel() == 0 for m in matrices), "a dense copy of a quantized matrix was kept"
    assert sum(m.method.nbytes for m in matrices) == file_bytes
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    assert dense < file_bytes / 4  # what is left dense: norms and biases
    if model.lm_head is None:  # tied: the LM head multiplies by the embedding's own blocks
        assert model.cpu_lm_head is model.model.embed_tokens.method


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def test_arch_config_from_metadata(gguf_checkpoint, hf_checkpoint) -> None:
    for name in ("llama-untied-bias", "qwen2", "qwen3", "llama-linear"):
        gguf_config = read_arch_config(gguf_checkpoint(name, "F32")[0])
        hf_config = read_arch_config(hf_checkpoint(name))
        for field in (
            "architecture", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling",
            "max_position_embeddings", "tie_word_embeddings", "qkv_bias", "o_proj_bias", "qk_norm",
        ):  # fmt: skip
            assert getattr(gguf_config, field) == pytest.approx(getattr(hf_config, field)), (name, field)
        assert gguf_config.torch_dtype is None


def test_unknown_architecture_is_named(gguf_checkpoint) -> None:
    path, _ = gguf_checkpoint("llama", "F32", arch_override="falcon")
    with pytest.raises(
        ValueError, match=r"general\.architecture 'falcon' is not supported.*llama, qwen2, qwen3"
    ):
        _load(path)


def test_unsupported_tensor_type_is_named(gguf_checkpoint) -> None:
    path, _ = gguf_checkpoint("llama", "Q8_0", type_overrides={"attn_k": "Q5_0"})
    with pytest.raises(
        ValueError, match=r"tensor blk\.\d+\.attn_k\.weight has type Q5_0; quire supports F32, F16"
    ):
        _load(path)


def test_gguf_refuses_quantization_and_other_dtypes(gguf_checkpoint) -> None:
    path, _ = gguf_checkpoint("llama", "Q8_0")
    with pytest.raises(ValueError, match="already quantized"):
        _load(path, quantization="int8")
    with pytest.raises(ValueError, match="float32 on the CPU"):
        load_model(path, "bfloat16", "cpu", progress=False)


def test_big_endian_file_config_reads_but_weights_are_refused(gguf_checkpoint, tmp_path: Path) -> None:
    path, _ = gguf_checkpoint("llama", "F32")
    reader = gguf.GGUFReader(path)
    swapped = tmp_path / "big-endian.gguf"
    writer = gguf.GGUFWriter(
        swapped, reader.fields["general.architecture"].contents(), endianess=gguf.GGUFEndian.BIG
    )
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            sub_type = field.types[1] if len(field.types) > 1 else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert read_arch_config(swapped) == read_arch_config(path)  # metadata decoded in its byte order
    with pytest.raises(ValueError, match="big-endian GGUF file; quire loads little-endian"):
        _load(swapped)


def test_not_a_model_path(tmp_path: Path) -> None:
    stray = tmp_path / "weights.bin"
    stray.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a GGUF file"):
        _load(stray)
    with pytest.raises(ValueError, match="not a directory"):
        _load(tmp_path / "missing")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ValueError, match=r"broken\.gguf: the GGUF header is truncated at byte 4"):
        _load(broken)


def test_quantization_option_is_validated() -> None:
    assert ModelConfig("m", quantization="int4").quantization == "int4"
    with pytest.raises(ValueError, match="quantization must be one of int8, int4"):
        ModelConfig("m", quantization="fp8")
    for command in (["generate"], ["serve"], ["bench", "offline"]):
        ns = parse_args([*command, "--quantization", "int8", "model-dir"])
        assert engine_args_from(ns).model_config("model-dir").quantization == "int8"
    with pytest.raises(SystemExit):
        parse_args(["serve", "--quantization", "fp8", "model-dir"])


# ---------------------------------------------------------------------------------------------
# --quantization on a safetensors checkpoint
# ---------------------------------------------------------------------------------------------


# Tiny random models amplify weight noise (~10x from weight to logit relative error), so the
# closeness bounds are loose; measured on this checkpoint, with the vocabulary matrices in Q8_0 too:
# int8 (Q8_0) worst |logit diff| 0.25 with 95.6% greedy agreement, int4 (Q4_1) 2.8 and 62% (logits of std ~2). Exactness is checked
# separately: against transformers on the same weights quantized and dequantized by gguf-py.
@pytest.mark.parametrize(("method", "quant_type", "max_diff", "min_agree"), [
    ("int8", "Q8_0", 0.5, 0.9),
    ("int4", "Q4_1", 5.0, 0.5),
])  # fmt: skip
def test_weight_only_quantization(
    hf_checkpoint, tmp_path: Path, method: str, quant_type: str, max_diff: float, min_agree: float
) -> None:
    model_dir = hf_checkpoint("llama")
    seqs = _random_seqs(512, [9, 15, 21], seed=5)
    fp32 = _run_schedule(_load(model_dir), seqs, block_size=16)
    model = _load(model_dir, quantization=method)
    for linear in _linears(model):
        assert isinstance(linear.method, QuantizedLinearWeight) and linear.method.quant_type == quant_type
        assert linear.weight.numel() == 0
    # The embedding (and the tied LM head) in int8 under both methods (VOCAB_METHODS).
    assert model.model.embed_tokens.method.quant_type == "Q8_0"
    assert model.model.embed_tokens.weight.numel() == 0
    _assert_matches_reference(model, _dequantized_twin(model_dir, tmp_path, quant_type), method)
    quantized = _run_schedule(model, seqs, block_size=16)
    worst = max((quantized[k] - fp32[k]).abs().max().item() for k in fp32)
    agree = sum(bool(quantized[k].argmax() == fp32[k].argmax()) for k in fp32) / len(fp32)
    print(f"{method}: worst |logit diff| vs fp32 {worst:.3f}, greedy agreement {agree:.1%}")
    assert 0 < worst < max_diff and agree >= min_agree, (worst, agree)


def _dequantized_twin(model_dir: Path, tmp_path: Path, quant_type: str) -> Path:
    """A copy of the checkpoint whose decoder matrices went through gguf-py's quantize/dequantize
    in ``quant_type``, and its vocabulary matrices in Q8_0 (VOCAB_METHODS)."""
    twin = Path(shutil.copytree(model_dir, tmp_path / "twin"))
    weights = load_file(twin / "model.safetensors")
    for name, tensor in weights.items():
        if name.startswith("model.layers.") and tensor.dim() == 2:
            qtype = gguf.GGMLQuantizationType[quant_type]
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            qtype = gguf.GGMLQuantizationType.Q8_0
        else:
            continue
        values = gguf.quants.dequantize(gguf.quants.quantize(tensor.float().numpy(), qtype), qtype)
        weights[name] = torch.from_numpy(values.reshape(tensor.shape).astype("float32"))
    save_file(weights, twin / "model.safetensors", metadata={"format": "pt"})
    return twin
