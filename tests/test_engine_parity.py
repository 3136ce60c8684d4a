"""End-to-end engine output against the transformers reference, under every scheduling regime.

Greedy tokens must be identical to ``transformers`` ``generate()`` for a batch of 8 prompts of
different lengths on tiny random models of each architecture, with chunked prefill on and off,
prefix caching on and off, and under forced preemption. Seeded sampling must not depend on the
batch a request happens to share.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from quire import LLM, SamplingParams

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
MAX_TOKENS = 24
VOCAB = 512


def make_prompts(seed: int = 0) -> list[list[int]]:
    """8 prompts of 3..70 tokens; several share a 32-token prefix so the prefix cache has work."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, VOCAB) for _ in range(32)]
    lengths = [3, 17, 40, 70, 9, 33, 48, 64]
    prompts = []
    for i, length in enumerate(lengths):
        if length > 32 and i % 2 == 0:
            prompts.append(shared + [rng.randrange(3, VOCAB) for _ in range(length - 32)])
        else:
            prompts.append([rng.randrange(3, VOCAB) for _ in range(length)])
    return prompts


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    outputs = []
    for prompt in prompts:  # one at a time: padding would change the reference's numerics
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        outputs.append(out[0, len(prompt) :].tolist())
    return outputs


@pytest.fixture(scope="module")
def references(tiny_model_dir: Callable[[str], Path]) -> dict[str, list[list[int]]]:
    prompts = make_prompts()
    return {arch: hf_greedy(tiny_model_dir(arch), prompts, MAX_TOKENS) for arch in ARCHS}


REGIMES = {
    "default": {},
    "small-chunks": {"max_num_batched_tokens": 16, "max_num_seqs": 8},
    "no-chunked-prefill": {"enable_chunked_prefill": False, "max_num_batched_tokens": 256},
    "no-prefix-cache": {"enable_prefix_caching": False},
    "preemption": {"num_kv_blocks": 12, "max_num_batched_tokens": 64, "max_num_seqs": 8},
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("regime", list(REGIMES))
def test_greedy_matches_transformers(tiny_model_dir, references, arch: str, regime: str) -> None:
    llm = LLM(
        str(tiny_model_dir(arch)), dtype="float32", max_model_len=256, show_progress=False, **REGIMES[regime]
    )
    prompts = make_prompts()
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    # Twice: the second pass runs on a warm prefix cache (when it is on).
    for attempt in range(2):
        results = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        got = [r.outputs[0].token_ids for r in results]
        for i, (mine, ref) in enumerate(zip(got, references[arch], strict=True)):
            assert mine == ref, (
                f"{arch}/{regime} pass {attempt}: prompt {i} ({len(prompts[i])} tokens) diverged"
            )
    engine = llm.engine
    if regime == "preemption":
        assert engine.core.scheduler.num_preemptions_total > 0
    if regime == "no-prefix-cache":
        assert engine.core.kv.stats.hits == 0
    elif regime != "preemption":
        assert engine.core.kv.stats.hits > 0
    assert engine.core.kv.num_free_blocks == engine.info.num_blocks  # every block back in the pool


@pytest.fixture(scope="module")
def llama_llm(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir("llama")), max_model_len=256, max_num_seqs=16, show_progress=False)


def test_seeded_sampling_is_independent_of_batch(tiny_model_dir) -> None:
    prompts = make_prompts(seed=1)
    target = {"prompt_token_ids": prompts[3]}
    seeded = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    others = SamplingParams(max_tokens=30, temperature=0.8, ignore_eos=True)

    def run(**engine_kwargs) -> list[list[int]]:
        llm = LLM(str(tiny_model_dir("llama")), max_model_len=256, show_progress=False, **engine_kwargs)
        alone = llm.generate(target, seeded)[0].outputs[0].token_ids
        batch = [{"prompt_token_ids": p} for p in prompts]
        batch.insert(5, target)
        mixed = llm.generate(batch, [others] * 5 + [seeded] + [others] * 3)[5].outputs[0].token_ids
        return [alone, mixed]

    baseline = run()
    assert baseline[0] == baseline[1]
    preempting = run(num_kv_blocks=10, max_num_batched_tokens=32, max_num_seqs=8)
    assert preempting == baseline
    assert len(set(baseline[0])) > 3  # it really sampled


def test_different_seeds_and_unseeded_vary(llama_llm: LLM) -> None:
    prompt = {"prompt_token_ids": make_prompts()[2]}
    a, b = (
        llama_llm.generate(prompt, SamplingParams(max_tokens=16, seed=s, ignore_eos=True))[0]
        .outputs[0]
        .token_ids
        for s in (1, 2)
    )
    assert a != b


def test_parallel_samples_n(llama_llm: LLM) -> None:
    params = SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    result = llama_llm.generate({"prompt_token_ids": make_prompts()[6]}, params)[0]
    assert [o.index for o in result.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 12 for o in result.outputs)
    assert len({tuple(o.token_ids) for o in result.outputs}) == 3
    again = llama_llm.generate({"prompt_token_ids": make_prompts()[6]}, params)[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in result.outputs]


def test_greedy_n_matches_single(llama_llm: LLM) -> None:
    prompt = {"prompt_token_ids": make_prompts()[4]}
    single = llama_llm.generate(prompt, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    many = llama_llm.generate(prompt, SamplingParams(n=2, max_tokens=10, temperature=0, ignore_eos=True))[0]
    assert [o.token_ids for o in many.outputs] == [single.outputs[0].token_ids] * 2


def test_stop_strings_eos_and_finish_reasons(llama_llm: LLM) -> None:
    prompt = {"prompt_token_ids": make_prompts()[1]}
    free = llama_llm.generate(prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[
        0
    ].outputs[0]
    assert free.finish_reason == "length"
    text = free.text
    assert len(text) > 6
    stop = text[3:6]
    cut = llama_llm.generate(prompt, SamplingParams(max_tokens=30, temperature=0, stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[: text.index(stop)]
    stop_token = free.token_ids[5]
    by_id = llama_llm.generate(
        prompt, SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[stop_token])
    )
    out = by_id[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_token
    assert out.token_ids == free.token_ids[: free.token_ids.index(stop_token) + 1]


def test_the_eos_or_stop_token_is_not_part_of_the_text(llama_llm: LLM) -> None:
    """The token that stops a sequence keeps its id in token_ids but, like a stop string, its
    text is left out even where special tokens are kept (unless include_stop_str_in_output)."""
    prompt = {"prompt_token_ids": make_prompts()[1]}
    eos = min(llama_llm.tokenizer.eos_token_ids)
    eos_text = llama_llm.tokenizer.decode([eos], skip_special_tokens=False)
    forced = {eos: 100.0}  # EOS as soon as min_tokens allows it
    base = dict(max_tokens=30, temperature=0, min_tokens=3, logit_bias=forced, skip_special_tokens=False)
    out = llama_llm.generate(prompt, SamplingParams(**base))[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == eos and len(out.token_ids) == 4
    assert out.text == llama_llm.tokenizer.decode(out.token_ids[:-1], skip_special_tokens=False)
    assert not out.text.endswith(eos_text)
    kept = llama_llm.generate(prompt, SamplingParams(**base, include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == out.text + eos_text


def test_logprobs_and_timings(llama_llm: LLM) -> None:
    result = llama_llm.generate("hello there", SamplingParams(max_tokens=5, temperature=0, logprobs=3))[0]
    out = result.outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    for token_id, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert token_id in entry and entry[token_id].rank == 1  # greedy picks the top token
        assert len(entry) == 3
    assert out.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs, strict=True))
    )
    m = result.metrics
    assert m.queue_time is not None and m.queue_time >= 0
    assert m.time_to_first_token is not None and m.decode_time is not None


def test_chat_uses_template(llama_llm: LLM) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    result = llama_llm.chat(messages, SamplingParams(max_tokens=4, temperature=0))[0]
    expected = llama_llm.tokenizer.encode(
        llama_llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True),
        add_special_tokens=False,
    )
    assert result.prompt_token_ids == expected


def test_bad_requests_are_rejected_without_side_effects(llama_llm: LLM) -> None:
    with pytest.raises(ValueError, match="context length"):
        llama_llm.generate({"prompt_token_ids": [5] * 300}, SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="256"):
        llama_llm.generate({"prompt_token_ids": [5] * 250}, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="vocabulary|in \\[0"):
        llama_llm.generate({"prompt_token_ids": [5, 10_000]}, SamplingParams(max_tokens=4))
    with pytest.raises(ValueError):
        llama_llm.generate(["fine", {"prompt_token_ids": [1] * 300}], SamplingParams(max_tokens=4))
    assert not llama_llm.engine.has_unfinished_requests()  # the valid half was not left running
    assert llama_llm.generate("still works", SamplingParams(max_tokens=2))[0].finished


def test_priority_runs_first_when_constrained(tiny_model_dir) -> None:
    llm = LLM(str(tiny_model_dir("llama")), max_model_len=256, max_num_seqs=1, show_progress=False)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    results = llm.generate(["a", "b", "c"], params, priority=[5, 0, 1])
    order = sorted(results, key=lambda r: r.metrics.first_token_time)
    assert [r.prompt for r in order] == ["b", "c", "a"]
