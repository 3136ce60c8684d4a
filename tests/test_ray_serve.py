"""quire on Ray Serve: a local Ray cluster, 2 replicas of the tiny model behind the ingress.

One Ray cluster for the module; the application is deployed once per router. Tests share it, in
file order: the default-router measurement comes first, then everything runs on the prefix-aware
router, and the replica-kill test comes last (it leaves a replaced replica behind).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from quire.config import EngineArgs  # noqa: E402
from quire.entrypoints.cli import engine_args_from, parse_args  # noqa: E402
from quire.server.settings import ServerSettings  # noqa: E402
from quire.serving.ray_app import AutoscalingSpec, RayAppConfig, build_app, config_from_dict  # noqa: E402
from quire.serving.ray_cli import app_config_from, wants_ray  # noqa: E402
from quire.serving.ray_ingress import _serve_refusal  # noqa: E402
from quire.serving.ray_metrics import merge_expositions  # noqa: E402

from server_fixtures import running_server  # noqa: E402

REPLICA_HEADER = "x-quire-replica"
CONFIG_FILE = Path(__file__).resolve().parents[1] / "deploy" / "ray" / "serve_config.yaml"
DEPLOY_TIMEOUT_S = 180.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RayService:
    """The module's Ray cluster and Serve instance; ``deploy(router)`` (re)deploys the app."""

    def __init__(self, model: Path) -> None:
        self.model = model
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.router: str | None = None
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})

    def deploy(self, router: str) -> None:
        if self.router == router:
            return
        if self.router is not None:
            serve.delete("quire")
        args = EngineArgs(
            model=str(self.model),
            max_model_len=1024,
            kv_cache_memory="32MiB",
            dtype="float32",
            max_num_seqs=8,
        )
        serve.run(build_app(RayAppConfig(engine_args=args, num_replicas=2, router=router)), name="quire")
        self.router = router
        self.wait_replicas(2)

    def replicas(self) -> list[dict]:
        return httpx.get(f"{self.url}/replicas", timeout=10).json()["replicas"]

    def pids(self) -> dict[str, tuple[int, int | None]]:
        """``{replica id: (replica pid, engine pid)}`` from the metrics hub (not served over HTTP)."""
        hub = serve.get_deployment_handle("QuireMetricsHub", app_name="quire")
        return {r.replica: (r.pid, r.engine_pid) for r in hub.reports.remote().result(timeout_s=10)}

    def wait_replicas(self, count: int, exclude: frozenset[str] = frozenset()) -> list[dict]:
        deadline = time.monotonic() + DEPLOY_TIMEOUT_S
        while time.monotonic() < deadline:
            rows = [r for r in self.replicas() if r["healthy"] and r["replica"] not in exclude]
            if len(rows) == count:
                return rows
            time.sleep(0.2)
        raise AssertionError(f"not {count} healthy replicas in time: {self.replicas()}")

    def metrics(self) -> dict[tuple[str, str], float]:
        """``{(sample name, replica label): value}`` from the ingress's /metrics."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {
            (sample.name, sample.labels.get("replica", "")): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def prefix_totals(self) -> tuple[float, float]:
        time.sleep(1.5)  # replicas report every 0.5 s
        m = self.metrics()
        hits = sum(v for (name, _), v in m.items() if name == "quire:prefix_cache_hits_total")
        queries = sum(v for (name, _), v in m.items() if name == "quire:prefix_cache_queries_total")
        return hits, queries

    def close(self) -> None:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.slow
def test_cli_serve_replicas_starts_serves_and_stops(tiny_llama_dir: Path) -> None:
    # First in the file: it runs before the module's own Ray cluster starts, so the command's
    # local Ray instance is the only one.
    with running_server(str(tiny_llama_dir), "--replicas", "2", "--max-num-seqs", "4") as server:
        # /health turns 200 with the first replica; "ready" is printed once every one is up.
        deadline = time.monotonic() + DEPLOY_TIMEOUT_S
        while "quire: ready" not in server.log_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "quire: ready" in server.log_text()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        served = set()
        for i in range(8):
            raw = client.completions.with_raw_response.create(
                model=str(tiny_llama_dir), prompt=f"hello {i}", max_tokens=3
            )
            served.add(raw.headers[REPLICA_HEADER])
        replicas = httpx.get(f"{server.url}/replicas", timeout=10).json()["replicas"]
        assert served == {r["replica"] for r in replicas} and len(replicas) == 2
        engine_pids = _engine_pids_under(server.proc.pid)
        assert len(engine_pids) == 2
    assert server.proc.returncode == 0
    assert not any(_pid_alive(pid) for pid in engine_pids)


@pytest.mark.slow
def test_serve_run_with_the_config_file(tiny_llama_dir: Path, tmp_path: Path) -> None:
    # Before the module's Ray cluster, as above. The shipped file, with a tiny model and a free port.
    yaml = pytest.importorskip("yaml")
    raw = yaml.safe_load(CONFIG_FILE.read_text())
    port = _free_port()
    raw["http_options"]["port"] = port
    args = raw["applications"][0]["args"]
    args["model"] = str(tiny_llama_dir)
    args["engine"] = {"max_num_seqs": 4, "kv_cache_memory": "32MiB", "dtype": "float32", "max_model_len": 512}
    args["replica_num_cpus"] = 0.5
    config = tmp_path / "serve_config.yaml"
    config.write_text(yaml.safe_dump(raw))
    serve_cli = Path(sys.executable).parent / "serve"
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(serve_cli), "run", str(config)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + DEPLOY_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError, ValueError):  # 404 text until the app exists
                if (
                    len(
                        [
                            r
                            for r in httpx.get(f"{url}/replicas", timeout=5).json()["replicas"]
                            if r["healthy"]
                        ]
                    )
                    == 2
                ):
                    break
            time.sleep(0.5)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200, (r.text, (tmp_path / "serve.log").read_text()[-3000:])
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def service(tiny_llama_dir: Path) -> Iterator[RayService]:
    svc = RayService(tiny_llama_dir)
    try:
        yield svc
    finally:
        svc.close()


@pytest.fixture()
def prefix_service(service: RayService) -> RayService:
    service.deploy("prefix")
    return service


def _shared_prefix_workload(groups: int, per_group: int) -> list[str]:
    """``groups`` distinct ~600-character system prompts, each followed by short user texts,
    interleaved so consecutive requests rarely share a prefix."""
    prompts = []
    for turn in range(per_group):
        for group in range(groups):
            system = f"System prompt {group}: " + " ".join(f"rule-{group}-{i}" for i in range(60))
            prompts.append(f"{system}\nUser {turn}: question {turn}")
    return prompts


def _run_workload(url: str, prompts: list[str]) -> list[str]:
    replicas = []
    with httpx.Client(timeout=60) as client:
        for prompt in prompts:
            r = client.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 2})
            assert r.status_code == 200, r.text
            replicas.append(r.headers[REPLICA_HEADER])
    return replicas


def test_prefix_router_hits_more_than_the_default_router(service: RayService) -> None:
    prompts = _shared_prefix_workload(groups=6, per_group=4)
    rates = {}
    for router in ("pow2", "prefix"):
        service.deploy(router)
        hits0, queries0 = service.prefix_totals()
        _run_workload(service.url, prompts)
        hits, queries = service.prefix_totals()
        rates[router] = (hits - hits0) / (queries - queries0)
    print(f"\nprefix-cache hit rate by router: {rates}")
    # Prefix routing: only each group's first request misses (3 of 4 hit). Ray's default router
    # scatters a group over both replicas, so both must compute its prefix once.
    assert rates["prefix"] > rates["pow2"], rates
    assert rates["prefix"] > 0.5, rates


def test_openai_client_through_the_ingress(prefix_service: RayService) -> None:
    client = openai.OpenAI(base_url=f"{prefix_service.url}/v1", api_key="none", max_retries=0)
    models = client.models.list().data
    assert [m.id for m in models] == [str(prefix_service.model)]
    model = models[0].id
    completion = client.completions.create(model=model, prompt="hello there", max_tokens=4)
    assert completion.choices[0].finish_reason in ("length", "stop")
    assert completion.usage is not None and completion.usage.completion_tokens >= 1
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert chat.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True
        )
    )
    assert len(chunks) >= 3  # role, content pieces, finish: streamed chunk by chunk
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    # quire's own validation answers through the relay: 400s in OpenAI's format, never a 500.
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=model, prompt="x", max_tokens=-1)
    assert bad.value.status_code == 400
    raw = httpx.post(f"{prefix_service.url}/v1/chat/completions", content=b"{not json", timeout=30)
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.get(f"{prefix_service.url}/v1/nothing-here", timeout=30)
    assert missing.status_code == 404 and "error" in missing.json()
    assert httpx.get(f"{prefix_service.url}/health", timeout=10).status_code == 200


def test_metrics_expose_every_replica(prefix_service: RayService) -> None:
    replicas = {r["replica"] for r in prefix_service.replicas()}
    time.sleep(1.0)
    metrics = prefix_service.metrics()
    labelled = {replica for (name, replica) in metrics if name == "quire:prefix_cache_queries_total"}
    assert labelled == replicas
    assert ("quire:ray_request_retries_total", "") in metrics


def test_requests_are_served_by_both_replicas(prefix_service: RayService) -> None:
    async def burst() -> list[str]:
        async with httpx.AsyncClient(timeout=60) as client:
            requests = [
                client.post(f"{prefix_service.url}/v1/completions", json={"prompt": f"q{i}", "max_tokens": 8})
                for i in range(12)
            ]
            return [r.headers[REPLICA_HEADER] for r in await asyncio.gather(*requests)]

    served = asyncio.run(burst())
    print(f"\nrequests served per replica: {sorted(collections.Counter(served).values(), reverse=True)}")
    assert set(served) == {r["replica"] for r in prefix_service.replicas()}


def test_shared_prefixes_stick_to_one_replica(prefix_service: RayService) -> None:
    prompts = _shared_prefix_workload(groups=4, per_group=3)
    served = _run_workload(prefix_service.url, prompts)
    by_group: dict[int, set[str]] = {}
    for index, replica in enumerate(served):
        by_group.setdefault(index % 4, set()).add(replica)
    assert all(len(replicas) == 1 for replicas in by_group.values()), by_group


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _engine_pids_under(root: int) -> list[int]:
    """The engine-core processes descending from ``root`` (the replicas' children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"--input-addr" not in cmdline:
            continue
        pid = ancestor = int(entry.name)
        while ancestor > 1 and ancestor != root:
            ancestor = _parent(ancestor)
        if ancestor == root:
            found.append(pid)
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


MAX_TOKENS_UNDER_KILL = 600
# A shared system prompt longer than one routing block: the prefix router sends the requests
# that carry it to the replica that served it first, so the test knows where they run.
KILL_PREFIX = "You answer briefly. " * 16


def _kill_messages(i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": KILL_PREFIX}, {"role": "user", "content": f"s{i}"}]


async def _stream(client: httpx.AsyncClient, url: str, i: int, started: asyncio.Queue[str]) -> dict:
    body = {
        "messages": _kill_messages(i),
        "max_tokens": MAX_TOKENS_UNDER_KILL,
        "ignore_eos": True,
        "stream": True,
    }
    events = []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        replica = r.headers[REPLICA_HEADER]
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 3:
                    started.put_nowait(replica)  # tokens are flowing on this replica
    assert events and events[-1] == "[DONE]", events[-3:]
    last = json.loads(events[-2])
    return {
        "replica": replica,
        "error": "error" in last,
        "finish": last.get("choices", [{}])[0].get("finish_reason"),
    }


async def _plain(client: httpx.AsyncClient, url: str, i: int) -> int:
    body = {"messages": _kill_messages(100 + i), "max_tokens": MAX_TOKENS_UNDER_KILL, "ignore_eos": True}
    r = await client.post(f"{url}/v1/chat/completions", json=body)
    assert r.status_code != 200 or r.json()["usage"]["completion_tokens"] == MAX_TOKENS_UNDER_KILL
    return r.status_code


def test_ingress_answers_health_probes_itself(prefix_service: RayService) -> None:
    for path in ("/health", "/health/ready", "/health/live"):
        r = httpx.get(f"{prefix_service.url}{path}", timeout=10)
        assert r.status_code == 200, (path, r.text)
        assert "x-quire-replica" not in r.headers  # not forwarded to a replica


def test_ingress_bounds_the_request_body(prefix_service: RayService) -> None:
    limit = ServerSettings().max_body_bytes
    url = f"{prefix_service.url}/v1/completions"
    big = b"x" * (limit + 1)
    # Content-Length over the limit: refused before the body is read.
    r = httpx.post(url, content=big, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["message"], r.text

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap applies while reading
        for start in range(0, len(big), 1 << 20):
            yield big[start : start + (1 << 20)]

    r = httpx.post(url, content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413, r.text


def test_killed_replica_is_retried_cut_cleanly_and_replaced(prefix_service: RayService) -> None:
    svc = prefix_service
    before = {r["replica"]: r for r in svc.replicas()}
    retries0 = svc.metrics().get(("quire:ray_request_retries_total", ""), 0.0)
    warm = {"messages": _kill_messages(-1), "max_tokens": 1}
    owner = httpx.post(f"{svc.url}/v1/chat/completions", json=warm, timeout=60).headers[REPLICA_HEADER]
    victim = before[owner]
    victim_pid, victim_engine = svc.pids()[owner]
    assert "pid" not in victim and "engine_pid" not in victim  # not served over HTTP

    async def load() -> tuple[list[dict], list[int]]:
        started: asyncio.Queue[str] = asyncio.Queue()
        async with httpx.AsyncClient(timeout=120) as client:
            streams, plains = [], []
            for i in range(8):  # interleaved: the prefix owner gets both kinds before any spill-over
                plains.append(asyncio.ensure_future(_plain(client, svc.url, i)))
                streams.append(asyncio.ensure_future(_stream(client, svc.url, i, started)))
            while await asyncio.wait_for(started.get(), timeout=60) != owner:
                pass
            # A stream on the owner is generating, so its plain requests (which send nothing
            # back before they finish) are in flight there too.
            os.kill(victim_pid, signal.SIGKILL)
            return await asyncio.gather(*streams), await asyncio.gather(*plains)

    streamed, plain = asyncio.run(asyncio.wait_for(load(), timeout=240))
    # Nothing reached the client from the plain requests on the dead replica: they were retried.
    assert plain == [200] * 8
    assert svc.metrics().get(("quire:ray_request_retries_total", ""), 0.0) > retries0
    # Streams cut mid-body end with an error event and [DONE]; the survivor's finish normally.
    for s in streamed:
        assert (s["error"], s["finish"]) == (
            (True, None) if s["replica"] == victim["replica"] else (False, "length")
        )
    assert any(s["error"] for s in streamed)
    retried = svc.metrics().get(("quire:ray_request_retries_total", ""), 0.0) - retries0
    cut = sum(s["error"] for s in streamed)
    print(f"\nreplica killed: 8/8 plain requests answered 200 ({retried:g} retries), {cut} of 8 streams cut")
    # The dead replica's engine process exits with it; Serve starts a replacement.
    deadline = time.monotonic() + 30
    assert victim_engine is not None
    while _pid_alive(victim_engine) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _pid_alive(victim_engine)
    svc.wait_replicas(1, exclude=frozenset(before))  # a new replica id, healthy
    svc.wait_replicas(2)
    r = httpx.post(f"{svc.url}/v1/completions", json={"prompt": "after", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200


def test_merge_expositions_labels_each_replica() -> None:
    text = '# TYPE quire:x counter\nquire:x_total{model_name="m"} 3.0\n'
    merged = merge_expositions([("r1", text), ("r2", text.replace("3.0", "5.0"))]).decode()
    values = {
        s.labels["replica"]: s.value
        for f in text_string_to_metric_families(merged)
        for s in f.samples
        if s.name == "quire:x_total"
    }
    assert values == {"r1": 3.0, "r2": 5.0}


def test_config_file_args_build_a_config(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(CONFIG_FILE.read_text())
    schema = ServeDeploySchema.model_validate(raw)  # Serve's own validation of the file
    app = schema.applications[0]
    assert app.import_path == "quire.serving.ray_app:app_builder"
    config = config_from_dict(app.args)
    assert config.router == "prefix" and config.autoscaling is not None
    scaling = config.scaling_options()["autoscaling_config"]
    assert scaling["target_ongoing_requests"] > 0 and scaling["max_replicas"] >= scaling["min_replicas"]
    with pytest.raises(ValueError, match="unknown engine field"):
        config_from_dict({"engine": {"max_num_seq": 4}})
    with pytest.raises(ValueError, match="router"):
        config_from_dict({"router": "nope"})
    with pytest.raises(ValueError, match="min_replicas"):
        AutoscalingSpec(min_replicas=3, max_replicas=2)
    # The CLI flags map onto the same config: --replicas is the initial count when autoscaling.
    ns = parse_args(["serve", "--replicas", "2", "--max-replicas", "4", "--target-ongoing-requests", "12"])
    cli = app_config_from(engine_args_from(ns), ServerSettings(), ns)
    scaling = cli.scaling_options()["autoscaling_config"]
    assert (scaling["initial_replicas"], scaling["max_replicas"], scaling["target_ongoing_requests"]) == (
        2,
        4,
        12,
    )
    fixed = parse_args(["serve", "--replicas", "3", "--router", "pow2"])
    assert app_config_from(engine_args_from(fixed), ServerSettings(), fixed).scaling_options() == {
        "num_replicas": 3
    }
    with pytest.raises(ValueError, match="--replicas"):
        bad = parse_args(["serve", "--replicas", "0"])
        app_config_from(engine_args_from(bad), ServerSettings(), bad)


def test_app_config_refuses_what_ray_serve_cannot_apply() -> None:
    # Checked by RayAppConfig itself, so serve_config.yaml gets the same refusals as the flags.
    for server, match in (
        ({"ssl_keyfile": "k.pem", "ssl_certfile": "c.pem"}, "TLS"),
        ({"root_path": "/api"}, "root-path"),
        ({"header_timeout": 5.0}, "header-timeout"),
    ):
        with pytest.raises(ValueError, match=match):
            config_from_dict({"server": server})
    with pytest.raises(ValueError, match="log_level"):
        RayAppConfig(log_level="chatty")
    with pytest.raises(ValueError, match="unknown ingress field"):
        config_from_dict({"ingress": {"max_body_bytes": 1}})  # --max-body-bytes (server) applies
    config = config_from_dict({"server": {"max_waiting": 7, "shutdown_timeout": 20}, "log_level": "info"})
    assert config.max_queued_requests == 7 and config.log_level == "info"
    assert config.graceful_shutdown_timeout_s > 20  # room for __del__ after the drain
    assert config_from_dict({"server": {"max_waiting": 0}}).max_queued_requests == 1


def test_autoscaling_flags_without_max_replicas_are_refused() -> None:
    for argv in (
        ["serve", "--replicas", "2", "--min-replicas", "1"],
        ["serve", "--replicas", "2", "--target-ongoing-requests", "9"],
    ):
        ns = parse_args(argv)
        with pytest.raises(ValueError, match="--max-replicas"):
            app_config_from(engine_args_from(ns), ServerSettings(), ns)
    # Scale-out flags without --replicas would be ignored by the single-process server.
    with pytest.raises(ValueError, match="--router"):
        wants_ray(parse_args(["serve", "--router", "pow2"]))
    assert not wants_ray(parse_args(["serve"]))
    ns = parse_args(["--log-level", "INFO", "serve", "--replicas", "2"])
    assert wants_ray(ns) and app_config_from(engine_args_from(ns), ServerSettings(), ns).log_level == "INFO"


def test_serve_refusals_map_to_503() -> None:
    from ray.serve.exceptions import BackPressureError

    refusal = BackPressureError(num_queued_requests=3, max_queued_requests=3)
    assert _serve_refusal(refusal) is refusal
    assert _serve_refusal(RuntimeError("a bug")) is None
