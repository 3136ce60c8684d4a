"""Many concurrent streams, metrics that add up, and disconnects that give KV blocks back.

One server for the module, with prefix caching off so every prompt token is counted as computed
and the prompt-token counter can be checked exactly.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest

from server_fixtures import ServerProcess, running_server

NUM_CLIENTS = 64
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server("--no-prefix-caching", "--max-num-seqs", "64") as srv:
        yield srv


async def _stream(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> dict:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    chunks, usage, done = 0, None, False
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                done = True
                continue
            payload = json.loads(data)
            if payload.get("usage"):
                usage = payload["usage"]
            chunks += sum(1 for c in payload["choices"] if c["finish_reason"] is None)
    return {"chunks": chunks, "usage": usage, "done": done}


def _delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_64_concurrent_streams_and_metrics(server: ServerProcess) -> None:
    prompts = [[100 + (i * 7 + j) % 1500 for j in range(5 + i % 11)] for i in range(NUM_CLIENTS)]
    before = server.metrics()

    async def run() -> list[dict]:
        limits = httpx.Limits(max_connections=NUM_CLIENTS)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            return await asyncio.gather(*(_stream(client, server.url, p, MAX_TOKENS) for p in prompts))

    results = asyncio.run(run())
    for prompt, result in zip(prompts, results, strict=True):
        assert result["done"]
        assert result["usage"]["completion_tokens"] == MAX_TOKENS
        assert result["usage"]["prompt_tokens"] == len(prompt)
        assert 1 <= result["chunks"] <= MAX_TOKENS

    after = server.metrics()
    assert _delta(after, before, "quire:request_success_total{finished_reason=length}") == NUM_CLIENTS
    assert _delta(after, before, "quire:generation_tokens_total") == NUM_CLIENTS * MAX_TOKENS
    assert _delta(after, before, "quire:prompt_tokens_total") == sum(len(p) for p in prompts)
    assert _delta(after, before, "quire:time_to_first_token_seconds_count") == NUM_CLIENTS
    assert _delta(after, before, "quire:e2e_request_latency_seconds_count") == NUM_CLIENTS
    assert _delta(after, before, "quire:request_queue_time_seconds_count") == NUM_CLIENTS
    assert _delta(after, before, "quire:request_prefill_time_seconds_count") == NUM_CLIENTS
    assert _delta(after, before, "quire:inter_token_latency_seconds_count") == NUM_CLIENTS * (MAX_TOKENS - 1)
    assert after["quire:kv_cache_usage_perc"] == 0.0
    assert after["quire:num_requests_running"] == 0.0 and after["quire:num_requests_waiting"] == 0.0
    for name in (
        "quire:prefix_cache_queries_total",
        "quire:prefix_cache_hits_total",
        "quire:requests_rate_limited_total",
    ):
        assert name in after
    assert "quire:requests_rejected_total{reason=backpressure}" in after


def _wait_for_idle_pool(server: ServerProcess, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        metrics = server.metrics()
        if metrics["quire:kv_cache_usage_perc"] == 0.0 and metrics["quire:num_requests_running"] == 0.0:
            return metrics
        assert time.monotonic() < deadline, f"KV cache still in use: {metrics['quire:kv_cache_usage_perc']}"
        time.sleep(0.1)


def test_disconnects_free_kv_blocks(server: ServerProcess) -> None:
    before = server.metrics()

    async def leave_early(client: httpx.AsyncClient, prompt: list[int]) -> int:
        body = {"prompt": prompt, "max_tokens": 400, "stream": True, "ignore_eos": True}
        seen = 0
        async with client.stream("POST", f"{server.url}/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    seen += 1
                    if seen == 3:
                        break  # closing the response mid-stream drops the connection
        return seen

    async def run() -> tuple[list[int], list[dict]]:
        async with httpx.AsyncClient(timeout=300) as leavers, httpx.AsyncClient(timeout=300) as stayers:
            leaving = [leave_early(leavers, [200 + i] * 40) for i in range(10)]
            staying = [_stream(stayers, server.url, [300 + i] * 20, 24) for i in range(6)]
            results = await asyncio.gather(asyncio.gather(*leaving), asyncio.gather(*staying))
            return results[0], results[1]

    seen, finished = asyncio.run(run())
    assert seen == [3] * 10
    assert all(r["done"] and r["usage"]["completion_tokens"] == 24 for r in finished)
    after = _wait_for_idle_pool(server)
    assert _delta(after, before, "quire:request_aborted_total") == 10
    assert _delta(after, before, "quire:request_success_total{finished_reason=length}") == 6
    # Aborted at once: far fewer tokens generated than the 10 x 400 the leavers asked for.
    assert _delta(after, before, "quire:generation_tokens_total") < 6 * 24 + 10 * 100
