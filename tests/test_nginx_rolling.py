"""Real nginx (deploy/nginx/quire.conf) in front of two real ``quire serve`` replicas, run by
deploy/rolling_restart.sh: SSE passes through unbuffered, a rolling restart under streaming load
fails no request, and a replica killed with SIGKILL is routed around.

Which replica served a request comes from nginx's access log (the ``quire`` log format records
the upstream address, every one tried, and the request id quire echoes back).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "deploy" / "rolling_restart.sh"
MODEL_NAME = "quire-tiny"
# --shutdown-timeout well above a stream's length: a drain must end because requests finished.
SERVE_ARGS = (
    "--max-model-len",
    "512",
    "--kv-cache-memory",
    "32MiB",
    "--dtype",
    "float32",
    "--max-num-seqs",
    "16",
    "--shutdown-timeout",
    "120",
    "--served-model-name",
    MODEL_NAME,
)
LOAD_REQUESTS = 64
LOAD_CONCURRENCY = 16
LOAD_MAX_TOKENS = 256
_DRAIN_LINE = re.compile(r"waiting up to \d+ s for (\d+) in flight")


def _nginx_binary() -> str:
    """nginx's path, installing Debian's package when it is missing and we may (root)."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("nginx is not installed and cannot be installed here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for package in ("nginx-light", "nginx"):
        result = subprocess.run(["apt-get", "install", "-y", package], env=env, capture_output=True)
        if result.returncode == 0 and os.path.exists("/usr/sbin/nginx"):
            return "/usr/sbin/nginx"
    pytest.skip("nginx is not installed and `apt-get install nginx-light` / `nginx` failed")
    raise AssertionError  # unreachable


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Deployment:
    """One deploy/rolling_restart.sh state directory and the nginx in front of it."""

    state: Path
    url: str
    env: dict[str, str]
    pids_seen: set[int] = field(default_factory=set)

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(SCRIPT), args[0], str(self.state), *args[1:]],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        self.replicas()  # remember every pid, for the teardown
        return result

    def replicas(self) -> dict[str, dict[str, str]]:
        """``{"r1": {"name", "port", "pid", "log"}, ...}`` from the state files."""
        found: dict[str, dict[str, str]] = {}
        for path in sorted((self.state / "replicas").glob("r*")):
            found[path.name] = dict(line.split("=", 1) for line in path.read_text().splitlines())
            self.pids_seen.add(int(found[path.name]["pid"]))
        return found

    def exit_status(self, pid: int) -> str:
        return (self.state / "run" / f"{pid}.rc").read_text().strip()

    def access_log(self) -> list[dict[str, str]]:
        """nginx's access log, each line's ``key=value`` fields and its status."""
        entries = []
        for line in (self.state / "nginx" / "logs" / "access.log").read_text().splitlines():
            entry = dict(re.findall(r"(\w+)=([^\s,]+(?:, [^\s,]+)*)", line))
            entry["status"] = line.split('" ', 1)[1].split()[0]
            entries.append(entry)
        return entries

    def kill_leftovers(self) -> None:
        """SIGKILL every replica this deployment ever had and stop its nginx (after a failure)."""
        if (self.state / "replicas").is_dir():
            self.replicas()
        for pid in self.pids_seen:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pid_file = self.state / "nginx" / "nginx.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass


@pytest.fixture(scope="module")
def deployment(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    nginx = _nginx_binary()
    quire = shutil.which("quire", path=str(Path(sys.executable).parent)) or "quire"
    env = {
        **os.environ,
        "QUIRE_BIN": quire,
        "NGINX_BIN": nginx,
        "READY_TIMEOUT": "240",
        "DRAIN_TIMEOUT": "180",
    }
    port = _free_port()
    deploy = Deployment(tmp_path_factory.mktemp("nginx-deploy") / "state", f"http://127.0.0.1:{port}", env)
    try:
        started = deploy.run(
            "start",
            "--replicas",
            "2",
            "--listen",
            f"127.0.0.1:{port}",
            "--",
            str(tiny_llama_dir),
            *SERVE_ARGS,
        )
        assert started.returncode == 0, started.stdout + started.stderr
        yield deploy
        stopped = deploy.run("stop", timeout=300)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    finally:
        deploy.kill_leftovers()


def test_openai_client_and_unbuffered_sse_through_nginx(deployment: Deployment) -> None:
    client = openai.OpenAI(base_url=f"{deployment.url}/v1", api_key="unused", max_retries=0)
    completion = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=5)
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage is not None and completion.usage.completion_tokens >= 1
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=5
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")

    started = time.monotonic()
    arrivals: list[float] = []
    stream = client.completions.create(
        model=MODEL_NAME, prompt="Once", max_tokens=128, stream=True, extra_body={"ignore_eos": True}
    )
    finish = None
    for chunk in stream:
        arrivals.append(time.monotonic())
        finish = chunk.choices[0].finish_reason if chunk.choices else finish
    assert finish == "length" and len(arrivals) >= 64
    # Buffered by nginx, the chunks would arrive in a few bursts at the end; passed through, they
    # arrive one by one while the stream is generated.
    first, last = arrivals[0] - started, arrivals[-1] - started
    distinct_ms = len({round(t * 1000) for t in arrivals})
    assert first < 0.5 * last, f"first chunk at {first:.3f} s, last at {last:.3f} s: buffered?"
    assert distinct_ms >= 32, f"only {distinct_ms} distinct arrival times for {len(arrivals)} chunks"


@dataclass
class StreamResult:
    status: int
    request_id: str
    done: bool = False
    finish_reason: str | None = None
    completion_tokens: int | None = None
    error: str | None = None
    started: float = 0.0
    ended: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            self.status == 200
            and self.done
            and self.finish_reason == "length"
            and self.completion_tokens == LOAD_MAX_TOKENS
        )


async def _sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    """The stream's lines, split at newlines only. Not ``aiter_lines``: it splits like
    ``str.splitlines``, also at U+2028, U+0085 and friends, which a random model's text (sent raw
    inside the JSON) contains."""
    pending = b""
    async for data in response.aiter_bytes():
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode()
    if pending:
        yield pending.decode()


def _read_event(event: dict, result: StreamResult) -> None:
    if "error" in event:
        result.error = event["error"].get("message")
    for choice in event.get("choices") or []:
        result.finish_reason = choice.get("finish_reason") or result.finish_reason
    if event.get("usage"):
        result.completion_tokens = event["usage"]["completion_tokens"]


async def _stream_one(client: httpx.AsyncClient, url: str, index: int) -> StreamResult:
    body = {
        "model": MODEL_NAME,
        "prompt": f"Request {index}:",
        "max_tokens": LOAD_MAX_TOKENS,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    result = StreamResult(status=0, request_id="", started=time.monotonic())
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            result.status = response.status_code
            result.request_id = response.headers.get("x-request-id", "")
            async for line in _sse_lines(response):
                if line == "data: [DONE]":
                    result.done = True
                elif line.startswith("data: "):
                    _read_event(json.loads(line[6:]), result)
    except (httpx.HTTPError, ValueError) as exc:  # ValueError: an event cut off mid-line
        result.error = f"{type(exc).__name__}: {exc}"
    result.ended = time.monotonic()
    return result


async def _load(
    url: str, until: asyncio.Future[object], minimum: int, concurrency: int
) -> list[StreamResult]:
    """``concurrency`` streams at a time until ``until`` is done and at least ``minimum`` ran."""
    results: list[StreamResult] = []
    issued = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < minimum or not until.done():
            issued += 1
            results.append(await _stream_one(client, url, issued))

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=10), limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return results


def _served_by(deployment: Deployment, results: list[StreamResult], labels: dict[str, str]) -> Counter[str]:
    """Requests per replica from nginx's access log, replicas named by ``labels`` (port -> name);
    ``"a, b"`` is a request nginx tried on a first and then retried on b."""
    ours = {r.request_id for r in results}
    served: Counter[str] = Counter()
    for entry in deployment.access_log():
        if entry.get("request_id") in ours:
            tried = [labels.get(addr.rsplit(":", 1)[-1], addr) for addr in entry["upstream"].split(", ")]
            served[", ".join(tried)] += 1
    return served


def _labels(**generations: dict[str, dict[str, str]]) -> dict[str, str]:
    """``_labels(old=replicas, new=replicas)`` -> ``{port: "r1-old", ...}``."""
    return {
        info["port"]: f"{name}-{when}" for when, reps in generations.items() for name, info in reps.items()
    }


async def _restart_under_load(deployment: Deployment) -> tuple[subprocess.CompletedProcess[str], list]:
    restart = asyncio.ensure_future(asyncio.to_thread(deployment.run, "restart"))
    results = await _load(deployment.url, restart, LOAD_REQUESTS, LOAD_CONCURRENCY)
    return await restart, results


def test_rolling_restart_under_streaming_load_fails_nothing(deployment: Deployment) -> None:
    before = deployment.replicas()
    restarted, results = asyncio.run(_restart_under_load(deployment))
    output = restarted.stdout + restarted.stderr
    assert restarted.returncode == 0, output
    after = deployment.replicas()

    failed = [r for r in results if not r.ok]
    assert len(results) >= LOAD_REQUESTS
    assert not failed, f"{len(failed)} of {len(results)} failed, e.g. {failed[:3]}\n{output}"
    for name, old in before.items():
        assert after[name]["pid"] != old["pid"] and after[name]["port"] != old["port"]
        assert deployment.exit_status(int(old["pid"])) == "0", f"old {name} did not drain cleanly"
        # The restart ran under load: every old replica still had streams to finish when stopped.
        drained = _DRAIN_LINE.findall(Path(old["log"]).read_text())
        assert drained and int(drained[0]) > 0, f"old {name} had nothing in flight: {drained}"
    served = _served_by(deployment, results, _labels(old=before, new=after))
    drains = {name: int(_DRAIN_LINE.findall(Path(old["log"]).read_text())[0]) for name, old in before.items()}
    print(f"\nrolling restart: {len(results)} streams, {len(failed)} failed, served by {dict(served)}; ")
    print(f"in flight at each old replica's SIGTERM: {drains}")
    assert sum(served.values()) == len(results)


def test_restart_aborts_when_the_new_replica_never_gets_ready(deployment: Deployment) -> None:
    before = deployment.replicas()
    upstreams = (deployment.state / "nginx" / "quire-upstreams.conf").read_text()
    good_args = (deployment.state / "serve.args").read_text()
    try:
        result = deployment.run("restart", "--", "/nonexistent/model-dir")
    finally:
        (deployment.state / "serve.args").write_text(good_args)
    assert result.returncode != 0
    assert "deploy stopped" in result.stderr and f"pid {before['r1']['pid']} still serving" in result.stderr
    # Nothing was touched: same replicas, same upstream list, and they still answer through nginx.
    assert deployment.replicas() == before
    assert (deployment.state / "nginx" / "quire-upstreams.conf").read_text() == upstreams
    client = openai.OpenAI(base_url=f"{deployment.url}/v1", api_key="unused", max_retries=0)
    assert client.completions.create(model=MODEL_NAME, prompt="Still", max_tokens=3).choices


async def _kill_under_load(deployment: Deployment, victim: int) -> tuple[float, list[StreamResult]]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[object] = loop.create_future()
    load = asyncio.ensure_future(_load(deployment.url, done, 48, 8))
    await asyncio.sleep(1.5)  # streams on both replicas
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    await asyncio.sleep(3.0)
    done.set_result(None)
    return killed_at, await load


def test_replica_killed_is_routed_around(deployment: Deployment) -> None:
    replicas = deployment.replicas()
    victim = int(replicas["r1"]["pid"])
    killed_at, results = asyncio.run(_kill_under_load(deployment, victim))
    cut = [r for r in results if not r.ok]
    # Only streams already running on the killed replica may fail: nginx cannot retry a response
    # that has started. Every request that began after the kill must succeed (nginx retries it).
    assert all(r.started < killed_at for r in cut), [r for r in cut if r.started >= killed_at]
    after_kill = [r for r in results if r.started >= killed_at]
    assert after_kill and all(r.ok for r in after_kill)
    assert len(cut) <= 8
    served = _served_by(deployment, results, {info["port"]: name for name, info in replicas.items()})
    print(
        f"\nfailover: {len(results)} streams, {len(cut)} cut by the kill, {len(after_kill)} started "
        f"after it all succeeded; served by {dict(served)}"
    )
    # Passive health check at work: a request nginx sent to the dead replica was retried on r2.
    assert served["r1, r2"] >= 1, served
    # A rolling restart also replaces a dead replica.
    healed = deployment.run("restart")
    assert healed.returncode == 0, healed.stdout + healed.stderr
    assert "had already exited with status 137" in healed.stdout
    status = deployment.run("status")
    assert status.stdout.count("/health/ready 200") == 2, status.stdout
