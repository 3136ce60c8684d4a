#!/usr/bin/env python3
"""Structured output: throughput with every request under a JSON schema, against the same
workload unconstrained, in one command on one engine.

64 requests (``--num-requests``) at concurrency 32 (``--concurrency``, the engine's
max_num_seqs) on the smollm2-135m-shape checkpoint, fp32, temperature 1.0 with a seed per
request. The two runs alternate for ``--rounds`` rounds each, constrained first. The
unconstrained run of a round generates exactly as many tokens per request as the constrained run
just did (EOS ignored), so both do the same model work and the ratio isolates the grammar's
cost: compile, mask fill (overlapped with the forward) and masking. Prefix caching is off so
that no round runs on another's cache. Also printed: the time to compile a schema never seen
before (what a request with a new schema pays once, before its first step).

    python benchmarks/structured_output.py                 # makes the checkpoint if needed
    python benchmarks/structured_output.py --num-requests 8 --concurrency 4 --rounds 1 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

from _common import DEFAULT_MODEL, ensure_model
from _common import EXTRACTION_SCHEMA as SCHEMA


def make_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Skip the low ids (special tokens live there in these tokenizers).
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(num)]


def run(llm, prompts: list[list[int]], params: list) -> tuple[float, list]:
    start = time.perf_counter()
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return time.perf_counter() - start, results


def compile_times(llm, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds to validate (API side) and to compile (engine side) schemas never seen before."""
    from quire.structured.backend import validate_structured_outputs
    from quire.structured.params import StructuredOutputsParams

    backend = llm.engine.core.executor.structured.backend
    validate, compile_ = [], []
    for i in range(repeats):
        params = StructuredOutputsParams(json={**SCHEMA, "title": f"new-{i}-{time.perf_counter_ns()}"})
        start = time.perf_counter()
        validate_structured_outputs(params)
        middle = time.perf_counter()
        backend.compile(params)
        validate.append(middle - start)
        compile_.append(time.perf_counter() - middle)
    return validate, compile_


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=32, help="the engine's max_num_seqs")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2, help="constrained / unconstrained runs, alternating")
    ap.add_argument("--compile-repeats", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    model = ensure_model(a.model, a.preset)
    from quire import LLM, SamplingParams
    from quire.structured.params import StructuredOutputsParams

    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    llm = LLM(
        str(model),
        dtype="float32",
        max_num_seqs=a.concurrency,
        enable_prefix_caching=False,
        show_progress=False,
    )
    print(
        f"workload: {a.num_requests} requests at concurrency {a.concurrency}, {a.input_len} prompt tokens, "
        f"max_tokens {a.max_tokens}, temperature 1.0; torch threads={__import__('torch').get_num_threads()}, "
        f"cores={os.cpu_count()}",
        flush=True,
    )
    constraint = StructuredOutputsParams(json=SCHEMA)

    def constrained(seed: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=a.max_tokens, temperature=1.0, seed=seed, structured_outputs=constraint
        )

    # Warm-up: the grammar engine's tokenizer, the schema's compile, the kernels.
    warm = make_prompts(4, a.input_len, vocab, a.seed + 999)
    run(llm, warm, [constrained(i) for i in range(4)])
    run(llm, warm, [SamplingParams(max_tokens=8, ignore_eos=True)] * 4)

    rates: dict[str, list[float]] = {"constrained": [], "unconstrained": []}
    for r in range(a.rounds):
        prompts = make_prompts(a.num_requests, a.input_len, vocab, a.seed + r)
        seconds, results = run(llm, prompts, [constrained(a.seed * 1000 + i) for i in range(len(prompts))])
        lengths = [len(res.outputs[0].token_ids) for res in results]
        cut = sum(res.outputs[0].finish_reason == "length" for res in results)
        tokens = sum(lengths)
        rates["constrained"].append(tokens / seconds)
        print(
            f"round {r + 1} constrained:   {tokens:6d} tokens in {seconds:6.2f} s = {tokens / seconds:8.1f} tok/s "
            f"({cut} cut by max_tokens)",
            flush=True,
        )
        same = [
            SamplingParams(max_tokens=n, temperature=1.0, seed=a.seed * 1000 + i, ignore_eos=True)
            for i, n in enumerate(lengths)
        ]
        seconds, results = run(llm, prompts, same)
        tokens = sum(len(res.outputs[0].token_ids) for res in results)
        rates["unconstrained"].append(tokens / seconds)
        print(
            f"round {r + 1} unconstrained: {tokens:6d} tokens in {seconds:6.2f} s = {tokens / seconds:8.1f} tok/s",
            flush=True,
        )

    stats = llm.engine.core.executor.structured.stats
    print(
        f"mask fills: {stats.fills} steps, {1e3 * stats.fill_seconds / max(stats.fills, 1):.2f} ms each on "
        f"average, {100 * stats.hidden_fraction:.0f}% of it hidden behind the forward"
    )
    c = statistics.mean(rates["constrained"])
    u = statistics.mean(rates["unconstrained"])
    print(f"mean throughput: constrained {c:.1f} tok/s, unconstrained {u:.1f} tok/s")
    print(f"ratio constrained / unconstrained: {c / u:.3f}")
    validate, compile_ = compile_times(llm, a.compile_repeats)
    print(
        f"new schema: validate (API side) median {1e3 * statistics.median(validate):.2f} ms, "
        f"compile (engine) median {1e3 * statistics.median(compile_):.2f} ms, max {1e3 * max(compile_):.2f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
