"""Start a server (quire or vLLM), wait until it answers, drive it with ``quire bench serve``, stop it.

Every server gets the same load generator command, so the only thing that differs between two rows
of the comparison is the server.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SERVED_NAME = "bench"
QUIRE_LISTENING = re.compile(r"listening on (http://[0-9.]+:\d+)")
# What quire prints once at start-up about its dtype choice, KV cache and kernel tier (quire/worker/worker.py,
# quire/kernels/cpu_ops.py); kept in results.json beside the numbers they explain.
QUIRE_STARTUP_LINES = {
    "dtype": re.compile(r"^quire: dtype: (.+)$", re.MULTILINE),
    "cpu_kernels": re.compile(r"^quire: CPU kernels: (.+)$", re.MULTILINE),
    "kv_cache": re.compile(r"^quire: KV cache: (.+)$", re.MULTILINE),
}


@dataclass
class Server:
    """A server process we started, its URL once known, and where its log goes."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str | None = None
    started: float = field(default_factory=time.monotonic)
    ready_s: float | None = None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, grace_s: float = 60.0) -> None:
        """SIGTERM the server process, which shuts its own children down (quire drains in-flight
        requests, vLLM stops its engine core); SIGKILL it after ``grace_s``; then SIGKILL whatever
        of its process group is left (an engine process that outlived its parent)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def quire_startup_facts(log_text: str) -> dict[str, str]:
    """The dtype choice, KV cache and kernel tier a quire server printed at start-up (those it printed)."""
    facts = {}
    for name, pattern in QUIRE_STARTUP_LINES.items():
        match = pattern.search(log_text)
        if match:
            facts[name] = match.group(1).strip()
    return facts


def _get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _spawn(name: str, command: list[str], log_path: Path, env: dict[str, str] | None = None) -> Server:
    log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the server
    # A new session: the server and any process it forks form one group we can signal at once.
    proc = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True
    )
    return Server(name=name, proc=proc, log_path=log_path)


def wait_ready(server: Server, timeout_s: float, health_path: str = "/health") -> Server:
    """Block until ``server.url + health_path`` answers 200; raises RuntimeError on exit or timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited with {server.proc.returncode} during start-up; "
                f"log {server.log_path}:\n{server.log_tail()}"
            )
        if server.url is None and server.name == "quire":
            match = QUIRE_LISTENING.search(server.log_path.read_text(errors="replace"))
            server.url = match.group(1) if match else None
        if server.url is not None and _get_ok(server.url + health_path):
            server.ready_s = time.monotonic() - server.started
            return server
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"{server.name} not ready after {timeout_s:.0f} s; log {server.log_path}")


def start_quire(
    model: Path, max_num_seqs: int, log_path: Path, *, dtype: str = "float32", timeout_s: float = 600
) -> Server:
    command = [
        sys.executable, "-m", "quire.entrypoints.cli", "serve", str(model), "--port", "0",
        "--served-model-name", SERVED_NAME, "--dtype", dtype, "--max-num-seqs", str(max_num_seqs),
    ]  # fmt: skip
    server = _spawn("quire", command, log_path)
    try:
        return wait_ready(server, timeout_s)
    except BaseException:
        server.stop()
        raise


def vllm_env(bind: str, kvcache_gib: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        VLLM_TARGET_DEVICE="cpu",
        VLLM_CPU_KVCACHE_SPACE=str(kvcache_gib),
        VLLM_CPU_OMP_THREADS_BIND=bind,
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    # The dev venv's variables must not leak into the vLLM venv's interpreter.
    for name in ("PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(name, None)
    return env


def start_vllm(
    venv: Path,
    model: Path,
    max_num_seqs: int,
    bind: str,
    log_path: Path,
    *,
    dtype: str = "float32",
    kvcache_gib: int = 4,
    timeout_s: float = 900,
    extra_args: list[str] | None = None,
) -> Server:
    python = venv / "bin" / "python"
    if not python.exists():
        raise RuntimeError(f"no vLLM venv at {venv}: run bash benchmarks/compare/setup_vllm.sh first")
    port = free_port()
    command = [
        str(python), str(HERE / "vllm_launcher.py"), "serve", str(model),
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED_NAME,
        "--dtype", dtype, "--max-num-seqs", str(max_num_seqs), *(extra_args or []),
    ]  # fmt: skip
    server = _spawn(f"vllm[bind={bind}]", command, log_path, env=vllm_env(bind, kvcache_gib))
    server.url = f"http://127.0.0.1:{port}"
    try:
        return wait_ready(server, timeout_s)
    except BaseException:
        server.stop()
        raise


def bench_serve(
    url: str,
    label: str,
    save: Path,
    *,
    concurrency: str,
    input_len: int,
    output_len: int,
    num_requests: int,
    seed: int,
    warmup: int,
) -> int:
    """Run ``quire bench serve`` against ``url``; its table goes to our stdout, its results to ``save``."""
    command = [
        sys.executable, "-m", "quire.entrypoints.cli", "bench", "serve", "--base-url", url,
        "--model", SERVED_NAME, "--concurrency", concurrency, "--input-len", str(input_len),
        "--output-len", str(output_len), "--num-requests", str(num_requests), "--seed", str(seed),
        "--warmup", str(warmup), "--save", str(save), "--label", label, "--no-progress",
    ]  # fmt: skip
    print("$ " + " ".join(command), flush=True)
    return subprocess.run(command, cwd=REPO).returncode
