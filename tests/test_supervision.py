"""Engine supervision: the restart policy with a fake client, then the real server with its
engine process killed by SIGKILL.

A dead engine fails the requests it was running (an SSE error event, not a hang), is restarted
(counted in /metrics, logged without prompt text), and later requests succeed; readiness is 503
while it restarts and liveness stays 200. Past ``--max-engine-restarts`` the server exits 1, and
SIGTERM right after a kill, or while a replacement loads, exits promptly with the IPC
directories removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from quire.frontend import protocol
from quire.frontend.async_client import EngineClient, EngineDeadError
from quire.server.supervisor import EngineSupervisor, RestartBudget

from server_fixtures import ServerProcess, engine_pid, running_server

SECRET = "zebra-quartz-lighthouse"  # prompt text that must never reach the log
RESTARTS = "quire:engine_restarts_total"


# -- the supervisor alone, with a fake client (no model, no processes) -------------------------


class _FakeClient(EngineClient):
    """Dies on demand; each ``restart`` pops the next outcome (None: comes back ready)."""

    def __init__(self, outcomes: list[str | None]) -> None:
        super().__init__()
        self.outcomes = outcomes
        self.restarts = 0

    async def start(self) -> None:
        self._ready = True

    async def shutdown(self) -> None:
        self._mark_dead("shut down", expected=True)

    async def restart(self) -> None:
        self.restarts += 1
        failure = self.outcomes.pop(0)
        if failure is not None:
            raise EngineDeadError(failure)
        self._dead = None

    def _send(self, message: protocol.EngineInput) -> None:
        pass


def _supervise(
    outcomes: list[str | None], budget: RestartBudget, stopping: bool = False
) -> tuple[_FakeClient, EngineSupervisor, list[str], list[int]]:
    client = _FakeClient(outcomes)
    fatal: list[str] = []
    counted: list[int] = []
    supervisor = EngineSupervisor(client, budget, fatal.append, lambda: counted.append(1), lambda: stopping)
    supervisor.watch()
    return client, supervisor, fatal, counted


def test_restart_budget_is_a_sliding_window() -> None:
    budget = RestartBudget(2, 60.0)
    assert budget.take(0.0) and budget.take(10.0)
    assert not budget.take(59.0)  # a third within 60 s of the first
    assert budget.take(60.5) and not budget.take(61.0)  # the first one aged out
    assert not RestartBudget(0, 1.0).take(0.0)
    with pytest.raises(ValueError, match="max_restarts"):
        RestartBudget(-1, 1.0)
    with pytest.raises(ValueError, match="window_s"):
        RestartBudget(1, float("inf"))


def test_supervisor_restarts_retries_then_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("quire.server.supervisor.RETRY_DELAY_S", 0.0)

    async def run() -> None:
        # A death, one failed reload, a good one: two restarts counted, serving again.
        client, supervisor, fatal, counted = _supervise(["boom", None], RestartBudget(3, 600.0))
        await client.start()
        client._mark_dead("killed")
        assert supervisor.restarting and not client.is_ready
        while supervisor.restarting:
            await asyncio.sleep(0)
        assert client.is_ready and client.restarts == 2 and len(counted) == 2 and not fatal
        # The third restart in the window works; the next death has no budget left.
        client.outcomes = [None]
        client._mark_dead("killed again")
        while supervisor.restarting:
            await asyncio.sleep(0)
        client._mark_dead("and again")
        while supervisor.restarting:
            await asyncio.sleep(0)
        assert client.restarts == 3 and len(fatal) == 1 and "and again" in fatal[0]
        assert supervisor.fatal_error == fatal[0]
        client._mark_dead("ignored")  # already fatal: nothing more happens
        assert not supervisor.restarting

    asyncio.run(run())


def test_supervisor_does_not_restart_while_stopping() -> None:
    async def run() -> None:
        client, supervisor, fatal, counted = _supervise([None], RestartBudget(3, 600.0), stopping=True)
        await client.start()
        client._mark_dead("killed during the drain")
        while supervisor.restarting:
            await asyncio.sleep(0)
        assert client.restarts == 0 and not counted and not fatal
        await client.shutdown()  # an expected stop is no death: no restart either
        assert client.restarts == 0

    asyncio.run(run())


# -- the real server ------------------------------------------------------------------------------


async def _one_stream(client: httpx.AsyncClient, url: str, index: int, started: list[int]) -> dict:
    body = {
        "prompt": f"{SECRET} {index}",
        "max_tokens": 480,
        "stream": True,
        "ignore_eos": True,
    }
    tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                return {"done": True, "tokens": tokens}
            if not line.startswith("data: {"):
                continue
            payload = json.loads(line[len("data: ") :])
            if "error" in payload:
                return {"error": payload["error"], "tokens": tokens}
            tokens += 1
            if tokens == 1:
                started.append(index)
    return {"cut": True, "tokens": tokens}


def _streams_in_thread(url: str, count: int) -> tuple[threading.Thread, list[int], list[dict]]:
    started: list[int] = []
    results: list[dict] = []

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            results.extend(
                await asyncio.gather(*(_one_stream(client, url, i, started) for i in range(count)))
            )

    thread = threading.Thread(target=lambda: asyncio.run(run()), daemon=True)
    thread.start()
    return thread, started, results


@pytest.fixture
def socket_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private TMPDIR for the server, so its engines' socket directories can be listed (other
    servers on this machine make theirs in /tmp); short, as socket paths are limited to ~100 bytes."""
    root = Path(tempfile.mkdtemp(prefix="qsup-"))
    monkeypatch.setenv("TMPDIR", str(root))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _engine_dirs(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.name.startswith("quire-engine-")]


def _wait_engine(server: ServerProcess, other_than: int | None = None, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = engine_pid(server)
        if pid is not None and pid != other_than:
            return pid
        time.sleep(0.05)
    raise AssertionError("no engine process appeared")


def _socket_dir(pid: int) -> Path:
    """The IPC directory an engine process was given (its ``--input-addr``)."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    addr = args[args.index(b"--input-addr") + 1].decode()
    return Path(addr.removeprefix("ipc://")).parent


def _wait_ready(url: str, timeout: float = 60.0, notice_s: float = 10.0) -> tuple[float, bool, bool]:
    """Poll until /health/ready is 200 after a kill; returns (seconds, saw ready 503, live was
    always 200). The API process notices the engine's death a moment after the kill (on a loaded
    machine, possibly after the first poll), so a 200 counts only once a 503 was seen or
    ``notice_s`` passed without one."""
    started = time.monotonic()
    saw_not_ready, live_ok = False, True
    while True:
        ready = httpx.get(f"{url}/health/ready", timeout=10).status_code
        live_ok &= httpx.get(f"{url}/health/live", timeout=10).status_code == 200
        if ready == 200 and (saw_not_ready or time.monotonic() - started > notice_s):
            return time.monotonic() - started, saw_not_ready, live_ok
        if ready == 200:
            time.sleep(0.02)
            continue
        assert ready == 503
        saw_not_ready = True
        assert time.monotonic() - started < timeout, "the engine did not come back"
        time.sleep(0.05)


def test_engine_killed_under_load_is_restarted_within_budget(socket_tmp: Path) -> None:
    with running_server("--max-engine-restarts", "1", "--engine-restart-window", "600") as server:
        assert httpx.get(f"{server.url}/health/live").status_code == 200
        assert httpx.get(f"{server.url}/health/ready").status_code == 200
        assert server.metrics()[RESTARTS] == 0
        old_pid = _wait_engine(server)
        old_dir = _socket_dir(old_pid)
        thread, started, results = _streams_in_thread(server.url, 12)
        deadline = time.monotonic() + 60
        while len(started) < 12:
            assert time.monotonic() < deadline and thread.is_alive(), "streams did not start"
            time.sleep(0.02)

        os.kill(old_pid, signal.SIGKILL)
        seconds, saw_not_ready, live_ok = _wait_ready(server.url)
        thread.join(30)
        assert not thread.is_alive(), "in-flight streams hung after the engine died"

        assert len(results) == 12
        for result in results:  # every in-flight stream ended with an error event: none hung or was cut
            assert "error" in result, result
            assert "engine" in result["error"]["message"]
        assert saw_not_ready and live_ok
        assert seconds < 30
        new_pid = _wait_engine(server, other_than=old_pid)
        new_dir = _socket_dir(new_pid)
        assert not old_dir.exists(), "the dead engine's socket directory was left behind"
        assert new_dir != old_dir

        metrics = server.metrics()  # nothing of the dead engine's batch is reported as running
        assert metrics["quire:num_requests_running"] == 0 and metrics["quire:kv_cache_usage_perc"] == 0
        response = httpx.post(
            f"{server.url}/v1/completions", json={"prompt": "hello", "max_tokens": 4}, timeout=60
        )
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4
        assert server.metrics()[RESTARTS] == 1

        # A second death within the window spends the budget of one: the server exits 1 so
        # that systemd or Kubernetes restarts it, and leaves no socket directory behind.
        os.kill(new_pid, signal.SIGKILL)
        assert server.proc.wait(30) == 1
        log = server.log_text()
        assert "restarting" in log and "restarted" in log and "max-engine-restarts 1" in log
        assert SECRET not in log
        assert not new_dir.exists() and not _engine_dirs(socket_tmp)


def test_sigterm_right_after_engine_kill_exits_promptly(socket_tmp: Path) -> None:
    # The hang this guards against: a send to an engine that is gone (an abort from a client
    # that left, the Shutdown message) blocked the event loop forever, so SIGTERM never finished.
    with running_server("--shutdown-timeout", "30") as server:
        pid = _wait_engine(server)
        socket_dir = _socket_dir(pid)
        body = {"prompt": "x", "max_tokens": 480, "ignore_eos": True, "stream": True}
        with contextlib.ExitStack() as streams:
            client = streams.enter_context(httpx.Client(timeout=30))
            lines = []  # held: a dropped line iterator would close its stream early
            for _ in range(4):
                response = streams.enter_context(
                    client.stream("POST", f"{server.url}/v1/completions", json=body)
                )
                assert response.status_code == 200
                lines.append(response.iter_lines())
                next(lines[-1])  # the stream is running in the engine
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.4)  # ZMQ drops the dead connection; the API notices only after 1 s of silence
        # Leaving the block closed the four connections: each one's abort is sent to the dead engine.
        server.proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        try:
            code = server.proc.wait(15)
        except subprocess.TimeoutExpired:
            raise AssertionError("the server hung on SIGTERM after the engine died") from None
        assert code == 0
        assert time.monotonic() - stopped < 12
        left = _engine_dirs(socket_tmp)  # a replacement may have been loading: its directory too
        assert not socket_dir.exists() and not left, left
        assert "Traceback" not in server.log_text()


def test_sigterm_while_restarting_exits_promptly(socket_tmp: Path) -> None:
    with running_server() as server:
        pid = _wait_engine(server)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while engine_pid(server) in (None, pid):  # the replacement is loading
            assert time.monotonic() < deadline, "no replacement engine was started"
            time.sleep(0.02)
        assert httpx.get(f"{server.url}/health/ready").status_code == 503
        server.proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        assert server.proc.wait(20) == 0
        assert time.monotonic() - stopped < 12
        assert not _engine_dirs(socket_tmp)
        assert "Traceback" not in server.log_text()
