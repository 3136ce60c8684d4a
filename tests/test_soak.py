"""Soak (opt-in: ``pytest -m slow tests/test_soak.py``): 2,000 streaming requests at concurrency 64
against a real ``quire serve`` of the demo checkpoint, with 20% of the clients hanging up mid-stream
and 5% of the requests malformed or extreme mixed in.

Asserted: no well-formed request gets a 5xx; every well-formed stream that the client did not
abort is complete (each choice has a finish_reason, usage is sent, ``max_tokens`` is honoured,
``[DONE]`` ends it); afterwards the engine holds no request and no KV block; and neither the API
process nor the engine process grew its resident memory by 5% or more between the end of a
warm-up phase and the end of the run. ``QUIRE_SOAK_REQUESTS`` / ``QUIRE_SOAK_CONCURRENCY`` scale it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from server_fixtures import ServerProcess, engine_pid, running_server

pytestmark = pytest.mark.slow

API_KEY = "sk-soak-0123456789abcdef"
MODEL = "quire-demo"
REQUESTS = int(os.environ.get("QUIRE_SOAK_REQUESTS", "2000"))
CONCURRENCY = int(os.environ.get("QUIRE_SOAK_CONCURRENCY", "64"))
WARMUP = max(64, REQUESTS // 5)
ABORT_SHARE = 0.20
BAD_SHARE = 0.05
MAX_RSS_GROWTH = 0.05
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()

# Malformed or extreme bodies (issue 11's list and the fuzz test's favourites). They may be
# refused; they must never take anyone else's request down with them.
BAD_BODIES: list[tuple[str, bytes]] = [
    ("/v1/completions", b'{"prompt": "hello", "max_tokens": 4, "top_p": 1e-50}'),
    ("/v1/completions", b'{"prompt": "hello", "max_tokens": 4, "repetition_penalty": 1e-50}'),
    ("/v1/completions", b'{"prompt": "hello", "max_tokens": 4, "temperature": 1e39, "min_tokens": 3}'),
    ("/v1/completions", b'{"prompt": "hello", "max_tokens": 4, "seed": 18446744073709551616}'),
    ("/v1/completions", b'{"prompt": "hello", "max_tokens": 4, "priority": -1000000000000000000000}'),
    ("/v1/completions", b'{"prompt": "hello", "max_tokens": 4, "top_k": 18446744073709551617}'),
    ("/v1/completions", b'{"prompt": "\\ud800", "max_tokens": 4}'),
    ("/v1/completions", b'{"prompt": [1, 2, 999999999], "max_tokens": 4}'),
    ("/v1/completions", b'{"prompt": "hello", "max_tokens": 4, "temperature": NaN}'),
    ("/v1/completions", b'{"prompt": "hello", "max_tokens": 1e308}'),
    ("/v1/completions", b'{"prompt": "hello", "max_tokens": 4, "logit_bias": {"5": 1e308}}'),
    ("/v1/completions", b'{"prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"),
    ("/v1/completions", b'{"prompt": "hello", "max_tokens": 4, "stream": true, "n": 1000}'),
    ("/v1/completions", b"{"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 4}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 4}'),
    ("/v1/chat/completions", b'{"messages": [], "max_tokens": 4}'),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, '
        b'"chat_template_kwargs": {"messages": 1, "add_generation_prompt": "x"}}',
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": true, '
        b'"top_p": 5e-324, "temperature": 1e-300}',
    ),
]


@dataclass
class Tally:
    """What the run saw; the assertions read it at the end."""

    statuses: Counter[str] = field(default_factory=Counter)
    bad_statuses: Counter[int] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    completed: int = 0
    aborted: int = 0

    def problem(self, text: str) -> None:
        if len(self.problems) < 50:
            self.problems.append(text)


def _good_body(rng: random.Random) -> tuple[str, dict[str, Any], int, bool]:
    """A well-formed streaming request: (path, body, n, ignore_eos)."""
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
    n = 2 if rng.random() < 0.1 else 1
    ignore_eos = rng.random() < 0.5
    common: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": rng.randint(1, 16),
        "stream": True,
        "stream_options": {"include_usage": True},
        "n": n,
        "ignore_eos": ignore_eos,
        "temperature": rng.choice([0.0, 0.7, 1.0]),
        "seed": rng.randint(0, 2**31),
    }
    if rng.random() < 0.5:
        return "/v1/completions", {**common, "prompt": words}, n, ignore_eos
    return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": words}]}, n, ignore_eos


def _check_stream(lines: list[str], body: dict[str, Any], n: int, ignore_eos: bool) -> str | None:
    """Why a complete (not aborted) stream is short or broken, or None."""
    events = [line[5:].strip() for line in lines if line.startswith("data:")]
    if not events or events[-1] != "[DONE]":
        return "no [DONE] at the end"
    finished: dict[int, str] = {}
    usage = None
    for event in events[:-1]:
        payload = json.loads(event)
        if "error" in payload:
            return f"error event {payload['error']}"
        for choice in payload.get("choices") or []:
            if choice.get("finish_reason") is not None:
                finished[choice["index"]] = choice["finish_reason"]
        usage = payload.get("usage") or usage
    if sorted(finished) != list(range(n)):
        return f"finish_reason for choices {sorted(finished)} of {n}"
    if usage is None:
        return "no usage chunk"
    tokens = usage["completion_tokens"]
    limit = body["max_tokens"] * n
    if tokens > limit or (ignore_eos and tokens != limit):
        return f"{tokens} completion tokens for max_tokens {body['max_tokens']} x n {n} (ignore_eos {ignore_eos})"
    if ignore_eos and set(finished.values()) != {"length"}:
        return f"finish reasons {finished} with ignore_eos"
    return None


async def _good(client: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    path, body, n, ignore_eos = _good_body(rng)
    abort_after = rng.randint(0, 3) if rng.random() < ABORT_SHARE else None
    lines: list[str] = []
    async with client.stream("POST", path, json=body) as response:
        tally.statuses[f"good {response.status_code}"] += 1
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            tally.problem(f"{path} -> {response.status_code}: {text[:200]}")
            return
        if abort_after is not None:
            # Hang up mid-stream: leaving the block closes the connection under the server.
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    abort_after -= 1
                    if abort_after < 0:
                        break
            tally.aborted += 1
            return
        async for line in response.aiter_lines():
            lines.append(line)
    problem = _check_stream(lines, body, n, ignore_eos)
    if problem:
        tally.problem(f"{path} short/broken stream: {problem}")
    tally.completed += 1


async def _bad(client: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    path, raw = rng.choice(BAD_BODIES)
    async with client.stream("POST", path, content=raw) as response:
        await response.aread()
        tally.bad_statuses[response.status_code] += 1


async def _run(url: str, count: int, seed: int, tally: Tally) -> None:
    rng = random.Random(seed)
    limit = asyncio.Semaphore(CONCURRENCY)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    limits = httpx.Limits(max_connections=CONCURRENCY * 2, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300, limits=limits) as client:

        async def one(i: int) -> None:
            own = random.Random(rng.random())
            async with limit:
                try:
                    if own.random() < BAD_SHARE:
                        await _bad(client, own, tally)
                    else:
                        await _good(client, own, tally)
                except httpx.HTTPError as exc:
                    tally.statuses[f"client error {type(exc).__name__}"] += 1
                    tally.problem(f"request {i}: {type(exc).__name__}: {exc}")

        await asyncio.gather(*(one(i) for i in range(count)))


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _wait_idle(server: ServerProcess, timeout_s: float = 60.0) -> dict[str, float]:
    """Poll /metrics until nothing runs, waits or holds KV blocks; the last sample either way."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = server.metrics()
        busy = {
            k: v
            for k, v in metrics.items()
            if k.startswith(
                ("quire:num_requests_running", "quire:num_requests_waiting", "quire:kv_cache_usage_perc")
            )
            and v
        }
        if not busy or time.monotonic() > deadline:
            return busy
        time.sleep(0.5)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    args = ["--api-key", API_KEY, "--max-num-seqs", str(CONCURRENCY), "--kv-cache-memory", "64MiB"]
    with running_server(*args) as srv:
        yield srv


def test_soak_streams_aborts_and_bad_requests(server: ServerProcess) -> None:
    engine = engine_pid(server)
    assert engine is not None, "no engine process found"
    started = time.monotonic()

    warm = Tally()
    asyncio.run(_run(server.url, WARMUP, seed=1, tally=warm))
    assert _wait_idle(server) == {}, "the engine is not idle after the warm-up"
    rss_before = {"api": _rss_bytes(server.proc.pid), "engine": _rss_bytes(engine)}

    tally = Tally()
    asyncio.run(_run(server.url, REQUESTS, seed=2, tally=tally))
    busy = _wait_idle(server)
    rss_after = {"api": _rss_bytes(server.proc.pid), "engine": _rss_bytes(engine)}
    growth = {k: rss_after[k] / rss_before[k] - 1 for k in rss_before}

    summary = (
        f"{REQUESTS} requests (+{WARMUP} warm-up) at concurrency {CONCURRENCY} in "
        f"{time.monotonic() - started:.0f} s: {dict(tally.statuses)}; completed streams {tally.completed}, "
        f"aborted {tally.aborted}; bad requests {dict(tally.bad_statuses)}; "
        f"RSS MiB before { ({k: v >> 20 for k, v in rss_before.items()}) } after "
        f"{ ({k: v >> 20 for k, v in rss_after.items()}) } growth { ({k: f'{v:+.1%}' for k, v in growth.items()}) }"
    )
    print(summary)
    assert engine_pid(server) == engine, "the engine process was replaced during the run"
    assert not tally.problems, f"{summary}\n" + "\n".join(tally.problems[:20])
    assert not warm.problems, "\n".join(warm.problems[:20])
    assert tally.statuses[f"good {200}"] == sum(v for k, v in tally.statuses.items()), summary
    assert tally.aborted > 0 and sum(tally.bad_statuses.values()) > 0
    assert busy == {}, f"engine still busy after the run: {busy}"
    for process, value in growth.items():
        assert value < MAX_RSS_GROWTH, f"{process} RSS grew {value:.1%}: {summary}"
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
