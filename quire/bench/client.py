"""An async streaming client for OpenAI-compatible ``/v1/completions``, timing every request.

Needs aiohttp (the ``bench`` extra); it is imported when a benchmark runs, not when quire loads.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from quire.bench.stats import RequestRecord


@dataclass(frozen=True)
class ServeTarget:
    """Where and how to send requests."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 1800.0
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if not self.model:
            raise ValueError("model must name the model the server serves (see its /v1/models)")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")

    @property
    def completions_url(self) -> str:
        return self.base_url.rstrip("/") + "/v1/completions"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def body(self, prompt: list[int], output_len: int) -> dict[str, Any]:
        return {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": output_len,
            "temperature": self.temperature,
            "ignore_eos": True,  # exactly output_len tokens, so servers are compared on equal work
            "stream": True,
            "stream_options": {"include_usage": True},
        }


def fetch_vocab_size(target: ServeTarget, timeout_s: float = 10.0) -> int | None:
    """The served model's vocabulary size from ``GET /v1/models`` (quire reports ``vocab_size``
    there), or None where the server does not say or cannot be asked."""
    request = urllib.request.Request(target.base_url.rstrip("/") + "/v1/models", headers=target.headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - http(s) only
            listing = json.loads(response.read())
    except (OSError, ValueError):
        return None
    entries = listing.get("data") if isinstance(listing, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and entry.get("id") == target.model:
            vocab = entry.get("vocab_size")
            return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab >= 2 else None
    return None


def _import_aiohttp():
    try:
        import aiohttp
    except ImportError as exc:
        raise ValueError(
            "quire bench serve needs aiohttp: pip install 'quire[bench]' (or pip install aiohttp)"
        ) from exc
    return aiohttp


def _carries_output(event: dict[str, Any]) -> bool:
    # A chunk with a choice is one step of output even when its text is empty (a token that ends
    # mid-character); the closing chunk some servers send (no text, finish_reason set) is not.
    return any(c.get("text") or c.get("finish_reason") is None for c in event.get("choices") or [])


async def stream_completion(
    session: Any, target: ServeTarget, prompt: list[int], output_len: int
) -> RequestRecord:
    """Send one streaming completion and time it; never raises (a failure is a failed record)."""
    aiohttp = _import_aiohttp()
    start = time.perf_counter()
    stamps: list[float] = []
    usage: dict[str, Any] | None = None
    try:
        timeout = aiohttp.ClientTimeout(total=target.timeout_s)
        async with session.post(
            target.completions_url,
            json=target.body(prompt, output_len),
            headers=target.headers,
            timeout=timeout,
        ) as response:
            if response.status != 200:
                text = await response.text()
                return RequestRecord(ok=False, error=f"HTTP {response.status}: {text[:200]}")
            buffer = b""
            async for data in response.content.iter_any():
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        continue
                    event = json.loads(payload)
                    if event.get("error"):
                        return RequestRecord(ok=False, error=f"stream error: {event['error']}")
                    if event.get("usage"):
                        usage = event["usage"]
                    if _carries_output(event):
                        stamps.append(time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - a load generator records every failure and goes on
        return RequestRecord(ok=False, error=f"{type(exc).__name__}: {exc}")
    e2e = time.perf_counter() - start
    # The usage chunk is the authority on token counts; chunks are the fallback for servers
    # that ignore stream_options.
    output_tokens = int((usage or {}).get("completion_tokens") or len(stamps))
    prompt_tokens = int((usage or {}).get("prompt_tokens") or len(prompt))
    return RequestRecord(
        ok=True,
        e2e_s=e2e,
        ttft_s=stamps[0] if stamps else e2e,
        output_tokens=output_tokens,
        prompt_tokens=prompt_tokens,
        chunk_times=tuple(stamps),
    )


async def run_level(
    target: ServeTarget,
    prompts: Sequence[list[int]],
    output_len: int,
    *,
    concurrency: int | None,
    arrivals: Sequence[float] | None = None,
    warmup_prompts: Sequence[list[int]] = (),
    on_done: Callable[[RequestRecord], None] | None = None,
) -> tuple[list[RequestRecord], float]:
    """Run one level: warm-up first (not returned), then ``prompts`` with at most ``concurrency`` in
    flight (None: no limit) and, if given, request ``i`` sent no earlier than ``arrivals[i]`` seconds
    after the start. Returns the records in prompt order and the wall time of the measured part."""
    aiohttp = _import_aiohttp()
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if arrivals is not None and len(arrivals) != len(prompts):
        raise ValueError(f"got {len(arrivals)} arrival times for {len(prompts)} prompts")
    limit = asyncio.Semaphore(concurrency) if concurrency is not None else None
    # A fresh connection per request: some servers (llama-server) close a connection after a
    # streamed response while advertising keep-alive, and a reused one then fails. Loopback
    # connects cost well under a millisecond, the same for every server.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def send(prompt: list[int]) -> RequestRecord:
            if limit is None:
                return await stream_completion(session, target, prompt, output_len)
            async with limit:
                return await stream_completion(session, target, prompt, output_len)

        if warmup_prompts:
            await asyncio.gather(*(send(p) for p in warmup_prompts))

        t0 = time.perf_counter()

        async def scheduled(i: int, prompt: list[int]) -> RequestRecord:
            if arrivals is not None:
                delay = arrivals[i] - (time.perf_counter() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)
            record = await send(prompt)
            if on_done is not None:
                on_done(record)
            return record

        records = await asyncio.gather(*(scheduled(i, p) for i, p in enumerate(prompts)))
        wall = time.perf_counter() - t0
    return list(records), wall
