#!/usr/bin/env python3
"""A burst of requests sharing a system prompt: waiting for a prompt block being computed, or not.

All ``--num-requests`` prompts start with the same ``--shared-len`` tokens (a system prompt) and
end with ``--own-len`` tokens of their own; they are submitted at once to one engine
(``LLM.generate``, ``--max-num-seqs`` at a time). quire's scheduler holds back a request whose next
prompt block another running request is computing, so the burst computes the shared part once
(``quire/core/scheduler.py``). The baseline is the same engine with that wait switched off (every
request admitted at once computes the shared blocks itself). Each variant runs in a fresh process,
alternated ``--rounds`` times; printed: wall time of the burst, prefix-cache hit rate, and the
median per-round ratio of the two times.

    .venv/bin/python benchmarks/prefix_burst.py
    .venv/bin/python benchmarks/prefix_burst.py --model DIR --num-requests 32 --shared-len 1024
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

from _common import DEFAULT_MODEL, ensure_model

VARIANTS = ("wait", "no-wait")

_RUN = r"""
import random, sys, time
from quire import LLM, SamplingParams
from quire.core.kv_manager import KVCacheManager

variant, model, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
num_requests, shared_len, own_len, output_len, max_num_seqs = map(int, sys.argv[4:9])
if variant == "no-wait":  # never report a block as being computed: nobody waits
    KVCacheManager.block_in_flight = lambda self, request, cached_prefix: False
llm = LLM(model, max_num_seqs=max_num_seqs, show_progress=False)
rng = random.Random(seed)
params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0)


def burst():
    shared = [rng.randrange(1000, 20000) for _ in range(shared_len)]
    prompts = [shared + [rng.randrange(1000, 20000) for _ in range(own_len)] for _ in range(num_requests)]
    kv = llm.engine.core.kv
    hits, queries = kv.stats.hits, kv.stats.queries
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return time.perf_counter() - start, (kv.stats.hits - hits) / (kv.stats.queries - queries)


burst()  # warm-up, on another shared prefix
print(*burst())
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=str(DEFAULT_MODEL), help="checkpoint (default: the smollm2-135m shape)"
    )
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--shared-len", type=int, default=512)
    parser.add_argument("--own-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    ns = parser.parse_args()
    if ns.model == str(DEFAULT_MODEL):
        ensure_model(DEFAULT_MODEL, "smollm2-135m")
    results: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    for round_index in range(ns.rounds):
        for variant in VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]:
            command = [sys.executable, "-c", _RUN, variant, ns.model, str(round_index)]
            command += [
                str(v) for v in (ns.num_requests, ns.shared_len, ns.own_len, ns.output_len, ns.max_num_seqs)
            ]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()
            seconds, hit_rate = float(out[-2]), float(out[-1])
            results[variant].append((seconds, hit_rate))
            print(
                f"round {round_index + 1}: {variant:8} {seconds:7.2f} s  hit rate {hit_rate:.3f}", flush=True
            )
    print(
        f"\n{ns.num_requests} requests at once: {ns.shared_len} shared + {ns.own_len} own prompt tokens, "
        f"{ns.output_len} output tokens, max {ns.max_num_seqs} running"
    )
    for variant in VARIANTS:
        runs = results[variant]
        print(
            f"{variant:8} median {statistics.median(s for s, _ in runs):7.2f} s   "
            f"hit rate {statistics.median(h for _, h in runs):.3f}"
        )
    ratios = [b[0] / a[0] for a, b in zip(results["wait"], results["no-wait"], strict=True)]
    print(f"no-wait / wait time: x{statistics.median(ratios):.2f} (median of {ns.rounds} rounds)")


if __name__ == "__main__":
    main()
