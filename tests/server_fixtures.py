"""Start the real ``quire serve`` as a subprocess on a free loopback port, for end-to-end tests.

``--port 0`` lets the OS pick the port (no race between choosing a free port and binding it); the
server prints ``listening on http://HOST:PORT`` and the helper then waits for ``/health`` to say 200.
Output goes to a log file, not a pipe, so a chatty server can never block on a full pipe.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

_LISTENING = re.compile(r"listening on (http://[0-9.]+:\d+)")
STARTUP_TIMEOUT_S = 180.0

# Small and quick: a short context so too-long prompts are cheap to build, a small KV pool.
FAST_ARGS = ("--max-model-len", "512", "--kv-cache-memory", "32MiB", "--dtype", "float32")


class ServerProcess:
    """A running ``quire serve``; ``url`` is its base URL."""

    # The log line that gives the server's address (subclasses: other schemes).
    listening_pattern = _LISTENING

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        command = [
            sys.executable,
            "-m",
            "quire.entrypoints.cli",
            "--log-level",
            "INFO",
            "serve",
            "--port",
            "0",
            *args,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.url = self._wait_listening()
        self._wait_healthy()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _fail(self, why: str) -> None:
        self.stop(signal.SIGKILL)
        raise RuntimeError(
            f"quire serve {' '.join(self.args)}: {why}\n--- server log ---\n{self.log_text()[-4000:]}"
        )

    def _wait_listening(self) -> str:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            match = self.listening_pattern.search(self.log_text())
            if match:
                return match.group(1)
            if self.proc.poll() is not None:
                self._fail(f"exited with code {self.proc.returncode} before listening")
            time.sleep(0.05)
        self._fail("did not start listening in time")
        raise AssertionError  # unreachable

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._fail(f"exited with code {self.proc.returncode} while loading")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self._fail("/health did not turn 200 in time")

    def metrics(self) -> dict[str, float]:
        """``/metrics`` parsed with prometheus_client's parser: ``{"name{label=value,...}": value}``
        (the ``model_name`` label left out), samples of every family."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@contextmanager
def running_server(*args: str) -> Iterator[ServerProcess]:
    """``with running_server("--api-key", "k") as server: ...`` -- stopped (SIGTERM) on exit."""
    log_dir = Path(tempfile.mkdtemp(prefix="quire-server-test-"))
    server = ServerProcess([*FAST_ARGS, *args], log_dir / "server.log")
    try:
        yield server
    finally:
        server.stop()


def engine_pid(server: ServerProcess) -> int | None:
    """The pid of a server's engine-core child process (Linux /proc), or None."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == server.proc.pid and b"quire.frontend.core_process" in cmdline:
            return int(entry.name)
    return None
