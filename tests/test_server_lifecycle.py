"""Process lifecycle: graceful SIGTERM drain, a dead engine seen by the API, a dead API seen by the engine."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx

from server_fixtures import engine_pid, running_server


async def _stream_all(url: str, count: int, max_tokens: int, started: threading.Event) -> list[dict]:
    """``count`` concurrent streams; ``started`` is set once every one has its first token."""
    first_tokens = 0

    async def one(client: httpx.AsyncClient, index: int) -> dict:
        nonlocal first_tokens
        body = {
            "prompt": [100 + index] * 8,
            "max_tokens": max_tokens,
            "stream": True,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
        stamps, finish, usage = [], None, None
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    payload = json.loads(line[len("data: ") :])
                    if "error" in payload:
                        return {"error": payload["error"]["message"], "stamps": stamps}
                    if payload["usage"] is not None:
                        usage = payload["usage"]
                    elif payload["choices"][0]["finish_reason"] is not None:
                        finish = payload["choices"][0]["finish_reason"]
                    else:
                        stamps.append(time.monotonic())
                    if len(stamps) == 1:
                        first_tokens += 1
                        if first_tokens == count:
                            started.set()
                elif line == "data: [DONE]":
                    return {"done": True, "stamps": stamps, "finish": finish, "usage": usage}
        return {"done": False, "stamps": stamps}

    async with httpx.AsyncClient(timeout=300) as client:
        return await asyncio.gather(*(one(client, i) for i in range(count)))


def _run_streams_in_thread(
    url: str, count: int, max_tokens: int
) -> tuple[threading.Thread, threading.Event, list]:
    started = threading.Event()
    results: list = []
    thread = threading.Thread(
        target=lambda: results.extend(asyncio.run(_stream_all(url, count, max_tokens, started)))
    )
    thread.start()
    return thread, started, results


def test_sigterm_drains_active_streams_then_exits_0() -> None:
    # Long streams (the fixture model decodes hundreds of tokens a second), and the checks below are
    # shown to have happened mid-drain by tokens that arrive after them, not by a sleep.
    max_tokens = 480
    with running_server("--shutdown-timeout", "300") as server:
        thread, started, results = _run_streams_in_thread(server.url, 8, max_tokens)
        assert started.wait(120), "streams did not start"
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while True:
            refused = httpx.post(
                f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=30
            )
            if refused.status_code != 200 or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 503
        checked = time.monotonic()
        thread.join(300)
        assert len(results) == 8
        for result in results:
            assert result.get("done") and result["finish"] == "length"
            assert result["usage"]["completion_tokens"] == max_tokens
        assert any(stamp > checked for result in results for stamp in result["stamps"]), (
            "the streams had ended before the drain was checked"
        )
        assert server.proc.wait(60) == 0
        assert "Traceback" not in server.log_text()


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def test_dead_engine_without_restarts_fails_requests_and_exits_1() -> None:
    # With no restart budget the first death is final: requests in flight get an error, and the
    # server exits non-zero so that its supervisor (systemd, Kubernetes) restarts it.
    # tests/test_supervision.py covers the restarts themselves.
    with running_server("--max-engine-restarts", "0") as server:
        pid = engine_pid(server)
        assert pid is not None
        thread, started, results = _run_streams_in_thread(server.url, 1, 400)
        assert started.wait(120)
        os.kill(pid, signal.SIGKILL)
        thread.join(60)
        assert "error" in results[0] and "engine" in results[0]["error"]
        assert server.proc.wait(30) == 1
        assert "max-engine-restarts 0" in server.log_text()


def test_engine_exits_when_api_dies() -> None:
    with running_server() as server:
        pid = engine_pid(server)
        assert pid is not None and _pid_alive(pid)
        server.proc.kill()
        server.proc.wait()
        deadline = time.monotonic() + 10
        while _pid_alive(pid):
            assert time.monotonic() < deadline, "the engine process outlived its API server"
            time.sleep(0.1)


def test_bad_model_path_fails_fast(tmp_path: Path) -> None:
    from quire.entrypoints.cli import main

    assert main(["serve", str(tmp_path / "missing")]) == 2
