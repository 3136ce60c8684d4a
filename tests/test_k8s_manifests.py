"""The Kubernetes manifests (deploy/k8s/) and the Grafana dashboard (deploy/grafana/) against quire.

Every YAML document is loaded into the official ``kubernetes`` client's model for its kind with
``ApiClient().deserialize(text, type_name, content_type)`` (public since client 35; pydantic
models that reject wrong types) and serialized back with ``sanitize_for_serialization``. The
deserializer silently drops fields its model does not have, so the round trip must equal the
input: a misspelled or unknown field fails the test. Custom resources (ServiceMonitor) and the
Kustomization have no model there and are checked by hand.

``kubectl create --dry-run=client`` would be the other offline check, but it still asks a server
for API discovery (it fails without a cluster), so kubectl is used for what works offline:
``kubectl kustomize`` must render exactly the objects the files hold.

The facts the manifests depend on come from quire itself, never from constants copied here: the
routes and their answers from the real FastAPI app (in process, engine not started: readiness
503, liveness 200, no API key needed), the container arguments through quire's own CLI parser,
the drain's extra seconds from ``quire.server.serve``, and the metric names and labels from the
app's real ``/metrics`` exposition parsed with ``prometheus_client.parser``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.utils import parse_quantity
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from starlette.testclient import TestClient

from quire.config import EngineArgs
from quire.entrypoints.cli import parse_args
from quire.frontend.async_client import InProcessEngineClient
from quire.server.app import build_app
from quire.server.serve import FAIL_FLUSH_S, FINAL_GRACE_S
from quire.server.settings import ServerSettings
from quire.server.state import ServerState

ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = ROOT / "deploy" / "k8s"
DASHBOARD = ROOT / "deploy" / "grafana" / "quire-dashboard.json"
# Lives in the Prometheus adapter's namespace, so it is applied on its own, not through kustomize.
NOT_IN_KUSTOMIZATION = frozenset({"prometheus-adapter-rules.yaml", "kustomization.yaml"})
# Labels Prometheus (through the Prometheus Operator's ServiceMonitor) adds to every scraped series.
TARGET_LABELS = frozenset({"namespace", "pod", "service", "endpoint", "container", "job", "instance"})
TEST_KEY = "sk-k8s-manifest-test"

Doc = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Loading


def manifest_files() -> list[Path]:
    return sorted(K8S_DIR.glob("*.yaml"))


def load_documents() -> list[tuple[str, Doc]]:
    """(file name, object) for every non-empty YAML document under deploy/k8s/."""
    docs = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


DOCS = load_documents()


def the(kind: str) -> Doc:
    found = [doc for _, doc in DOCS if doc["kind"] == kind]
    assert len(found) == 1, f"expected exactly one {kind} under deploy/k8s/, found {len(found)}"
    return found[0]


def builtin_model(doc: Doc) -> str | None:
    """The client's model class name for a built-in kind (``apps/v1`` Deployment ->
    ``V1Deployment``), or None for a custom resource."""
    group, _, version = doc["apiVersion"].rpartition("/")
    # Built-in groups are the core group (""), dotless ones (apps, policy, ...) or end in .k8s.io;
    # a CRD's group is a dotted domain, even if a model of the same kind name happens to exist.
    if "." in group and not group.endswith(".k8s.io"):
        return None
    name = version[:1].upper() + version[1:] + doc["kind"]
    return name if hasattr(k8s, name) else None


def round_trip(doc: Doc, model: str) -> Doc:
    api = k8s.ApiClient()
    obj = api.deserialize(json.dumps(doc), model, "application/json")
    assert type(obj).__name__ == model
    return api.sanitize_for_serialization(obj)


# ---------------------------------------------------------------------------------------------
# quire's side: the real app, its routes' answers, its metrics


@cache
def quire_app_client() -> TestClient:
    """The real app with an API key configured and the engine never started (no lifespan)."""
    settings = ServerSettings(api_keys=(TEST_KEY,))
    state = ServerState(settings, InProcessEngineClient(EngineArgs()), ("quire",), "", 1)
    return TestClient(build_app(state))


@cache
def exported_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """Sample name -> (family type, label names), from the app's real /metrics exposition."""
    response = quire_app_client().get("/metrics")
    assert response.status_code == 200
    samples: dict[str, tuple[str, frozenset[str]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            _, labels = samples.get(sample.name, (family.type, frozenset()))
            samples[sample.name] = (family.type, labels | frozenset(sample.labels))
    return samples


def container(deployment: Doc) -> Doc:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "the server pod has one container"
    return containers[0]


def serve_args(deployment: Doc) -> Any:
    """The container's command line through quire's own parser: an unknown flag fails here."""
    c = container(deployment)
    assert "command" not in c, "keep the image's ENTRYPOINT (quire); set args only"
    ns = parse_args(c["args"])
    assert ns.command == "serve"
    return ns


def resolve_port(c: Doc, port: int | str) -> int:
    """A probe's or a Service's target port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in c["ports"] if "name" in p}
    assert port in named, f"port name {port!r} is not one of the container's ports {sorted(named)}"
    return named[port]


# ---------------------------------------------------------------------------------------------
# Every object loads into its model or passes its hand check


def test_every_manifest_file_has_documents() -> None:
    assert {name for name, _ in DOCS} == {p.name for p in manifest_files()}
    kinds = sorted(doc["kind"] for _, doc in DOCS)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "Kustomization",
            "PodDisruptionBudget",
            "Service",
            "ServiceMonitor",
        ]
    )


@pytest.mark.parametrize(
    "doc",
    [doc for _, doc in DOCS if builtin_model(doc)],
    ids=lambda doc: f"{doc['kind']}/{doc['metadata']['name']}",
)
def test_builtin_objects_round_trip_through_client_models(doc: Doc) -> None:
    model = builtin_model(doc)
    assert model is not None
    assert round_trip(doc, model) == doc, f"{model}: a field is misspelled or unknown to Kubernetes"


def test_round_trip_catches_typos_and_wrong_types() -> None:
    # The negative control: the check above must be able to fail.
    typo = json.loads(json.dumps(the("Deployment")))
    container(typo)["livenesProbe"] = container(typo).pop("livenessProbe")
    assert round_trip(typo, "V1Deployment") != typo
    wrong_type = json.loads(json.dumps(the("Deployment")))
    wrong_type["spec"]["replicas"] = "two"
    with pytest.raises(ValidationError):
        round_trip(wrong_type, "V1Deployment")


def check_service_monitor(doc: Doc) -> None:
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["metadata"]["name"]
    spec = doc["spec"]
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}, sorted(spec)
    assert spec["selector"]["matchLabels"]
    assert spec["endpoints"], "a ServiceMonitor needs at least one endpoint"
    endpoint_fields = {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels"}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= endpoint_fields, sorted(endpoint)
        assert isinstance(endpoint["port"], str), "endpoints name a Service port by its name"
        assert endpoint["path"].startswith("/")
        for field in ("interval", "scrapeTimeout"):
            assert re.fullmatch(r"\d+(ms|s|m|h)", endpoint[field]), endpoint[field]


def check_kustomization(doc: Doc) -> None:
    assert doc["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert set(doc) <= {"apiVersion", "kind", "resources", "images", "namespace"}, sorted(doc)
    listed = set(doc["resources"])
    assert all((K8S_DIR / name).is_file() for name in listed), "every listed resource exists"
    assert listed == {p.name for p in manifest_files()} - NOT_IN_KUSTOMIZATION


HAND_CHECKS: dict[tuple[str, str], Callable[[Doc], None]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): check_service_monitor,
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): check_kustomization,
}


@pytest.mark.parametrize("doc", [doc for _, doc in DOCS if not builtin_model(doc)], ids=lambda d: d["kind"])
def test_custom_resources_pass_their_hand_check(doc: Doc) -> None:
    check = HAND_CHECKS.get((doc["apiVersion"], doc["kind"]))
    assert check is not None, f"no model and no hand check for {doc['apiVersion']} {doc['kind']}"
    check(doc)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_renders_the_same_objects() -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(K8S_DIR)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    objects = [doc for doc in yaml.safe_load_all(rendered) if doc is not None]
    listed = set(the("Kustomization")["resources"])
    expected = [doc for name, doc in DOCS if name in listed]
    key = lambda doc: (doc["kind"], doc["metadata"]["name"])  # noqa: E731
    assert sorted(objects, key=key) == sorted(expected, key=key)


# ---------------------------------------------------------------------------------------------
# The Deployment against quire


def test_probe_paths_are_real_routes_with_the_right_answers() -> None:
    c = container(the("Deployment"))
    http = quire_app_client()
    # Engine not started: liveness must already pass (a loading pod is not restarted), readiness
    # must not (a loading pod gets no traffic). Neither sends a key, though keys are configured.
    assert http.get(c["readinessProbe"]["httpGet"]["path"]).status_code == 503
    assert http.get(c["livenessProbe"]["httpGet"]["path"]).status_code == 200
    assert http.get(c["startupProbe"]["httpGet"]["path"]).status_code == 200
    assert http.get("/health/not-a-route").status_code == 404  # so the 200/503 above mean something
    routes = {getattr(route, "path", None) for route in http.app.routes}
    assert {c[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe", "startupProbe")} <= routes
    assert http.get("/v1/models").status_code == 401  # and keys really are enforced
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert resolve_port(c, c[probe]["httpGet"]["port"]) == serve_args(the("Deployment")).port


def test_container_args_parse_and_ports_line_up() -> None:
    deployment, service = the("Deployment"), the("Service")
    ns, c = serve_args(deployment), container(deployment)
    assert ns.host == "0.0.0.0", "listen on the pod IP, not only loopback"
    assert [p["containerPort"] for p in c["ports"]] == [ns.port]
    for port in service["spec"]["ports"]:
        assert resolve_port(c, port["targetPort"]) == ns.port
    monitor_ports = {e["port"] for e in the("ServiceMonitor")["spec"]["endpoints"]}
    assert monitor_ports <= {p["name"] for p in service["spec"]["ports"]}


def test_metrics_scrape_path_is_served_without_a_key() -> None:
    for endpoint in the("ServiceMonitor")["spec"]["endpoints"]:
        response = quire_app_client().get(endpoint["path"])
        assert response.status_code == 200
        assert "quire:num_requests_waiting" in response.text


def test_api_key_file_comes_from_the_secret_volume() -> None:
    deployment = the("Deployment")
    ns, pod = serve_args(deployment), deployment["spec"]["template"]["spec"]
    assert not ns.api_key, "keys on the command line are visible to anyone who can read the pod spec"
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container(deployment)["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret and ns.api_key_file.startswith(mount["mountPath"] + "/"):
            file_name = ns.api_key_file.removeprefix(mount["mountPath"] + "/")
            assert file_name in {item["path"] for item in secret["items"]}
            assert not secret.get("optional", False), "a missing Secret must stop the pod, not disable auth"
            return
    pytest.fail(f"--api-key-file {ns.api_key_file} is not in a mounted Secret")


def test_grace_period_covers_prestop_and_drain() -> None:
    deployment = the("Deployment")
    ns, pod = serve_args(deployment), deployment["spec"]["template"]["spec"]
    command = container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0].endswith("sleep") and len(command) == 2
    pre_stop = float(command[1])
    assert pre_stop > 0
    # After SIGTERM quire waits --shutdown-timeout for requests, then up to FAIL_FLUSH_S for the
    # failed ones' last bytes, then FINAL_GRACE_S for connections: all before SIGKILL.
    needed = pre_stop + ns.shutdown_timeout + FAIL_FLUSH_S + FINAL_GRACE_S
    assert pod["terminationGracePeriodSeconds"] > needed


def test_cache_env_points_into_writable_volumes() -> None:
    deployment = the("Deployment")
    c = container(deployment)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    env = {e["name"]: e["value"] for e in c["env"]}
    writable = [m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")]
    for name in ("QUIRE_CACHE_DIR", "QUIRE_KERNEL_CACHE", "TMPDIR"):
        assert any(env[name] == p or env[name].startswith(p + "/") for p in writable), name


def test_dockerfile_entrypoint_and_default_command_are_quire_serve() -> None:
    text = (K8S_DIR / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (.+)$", text, re.M).group(1))
    assert entrypoint == ["quire"]
    ns = parse_args(cmd)
    assert (ns.command, ns.host) == ("serve", "0.0.0.0")
    assert re.search(r"^USER \d+", text, re.M), "the image runs as a numeric non-root user"


# ---------------------------------------------------------------------------------------------
# Selectors, the HPA and its adapter rule


def test_selectors_match_the_pod_labels() -> None:
    deployment = the("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert the("Service")["spec"]["selector"].items() <= pod_labels.items()
    assert the("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    # A ServiceMonitor selects Services, by the Service's own labels.
    monitor = the("ServiceMonitor")["spec"]["selector"]["matchLabels"]
    assert monitor.items() <= the("Service")["metadata"]["labels"].items()
    target = the("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        deployment["kind"],
        deployment["metadata"]["name"],
    )


def adapter_rules() -> list[Doc]:
    config_map = the("ConfigMap")
    return yaml.safe_load(config_map["data"]["config.yaml"])["rules"]


def go_regex_replace(pattern: str, template: str, name: str) -> str | None:
    """The adapter's naming step (Go regexp Expand): ``${1}``/``$1`` are capture groups."""
    match = re.search(pattern, name)
    if match is None:
        return None
    return re.sub(r"\$\{(\d+)\}|\$(\d+)", lambda m: match.group(int(m.group(1) or m.group(2))), template)


def test_hpa_metric_is_the_adapter_rule_over_a_real_quire_gauge() -> None:
    hpa, ns = the("HorizontalPodAutoscaler"), serve_args(the("Deployment"))
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    wanted = metric["pods"]["metric"]["name"]
    exposed = {}
    for rule in adapter_rules():
        series = re.fullmatch(r"\{__name__=\"([^\"]+)\",(.*)\}", rule["seriesQuery"])
        assert series, f"select the series by __name__: {rule['seriesQuery']}"
        source = series.group(1)
        assert {"namespace", "pod"} <= set(rule["resources"]["overrides"])
        assert {"<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"} <= set(
            re.findall(r"<<\.\w+>>", rule["metricsQuery"])
        )
        exposed[go_regex_replace(rule["name"]["matches"], rule["name"]["as"], source)] = source
    assert wanted in exposed, f"HPA metric {wanted!r} is not exposed by the adapter ({sorted(exposed)})"
    kind, labels = exported_metrics()[exposed[wanted]]
    assert kind == "gauge" and "model_name" in labels
    # The target is a queue per pod, so it must sit below the point where quire answers 503.
    # A Kubernetes quantity: `quire plan` prints e.g. "2500m".
    target = parse_quantity(metric["pods"]["target"]["averageValue"])
    assert 0 < target < ns.max_waiting
    spec = hpa["spec"]
    assert 2 <= spec["minReplicas"] <= spec["maxReplicas"], "one pod must survive a PDB eviction"


# ---------------------------------------------------------------------------------------------
# The Grafana dashboard


_STRING = re.compile(r'"(?:\\.|[^"\\])*"')
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset"})


def promql_parts(expr: str) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """(metric name, labels matched on it) per selector in ``expr``, and the grouping labels."""
    text = _RANGE.sub("", _STRING.sub('""', expr))
    grouping = {label.strip() for m in _GROUPING.finditer(text) for label in m.group(1).split(",")}
    text = _GROUPING.sub(" ", text)
    selectors = []
    for m in _SELECTOR.finditer(text):
        rest = text[m.end() :].lstrip()
        if m.group(1) in _KEYWORDS or (not m.group(2) and rest.startswith("(")):
            continue  # a function call or an operator keyword
        selectors.append((m.group(1), set(_MATCHER.findall(m.group(2) or ""))))
    return selectors, grouping - {""}


def test_promql_parts_finds_metrics_and_labels() -> None:
    selectors, grouping = promql_parts(
        'histogram_quantile(0.9, sum by (le, pod) (rate(quire:x_bucket{namespace="$ns",reason=~"a|b"}'
        "[$__rate_interval]))) / on(pod) quire:y"
    )
    assert selectors == [("quire:x_bucket", {"namespace", "reason"}), ("quire:y", set())]
    assert grouping == {"le", "pod"}


def dashboard_queries(dashboard: Doc) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            call = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"])
            assert call, var["query"]
            selectors, _ = promql_parts(call.group(1))
            labels = exported_metrics()[selectors[0][0]][1] | TARGET_LABELS
            assert call.group(2) in labels, f"variable {var['name']}: no label {call.group(2)}"
            yield f"variable {var['name']}", call.group(1)


def test_dashboard_queries_use_metrics_and_labels_quire_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_metrics()
    used = set()
    for where, expr in dashboard_queries(dashboard):
        selectors, grouping = promql_parts(expr)
        assert selectors, f"{where}: no metric in {expr}"
        available = set(TARGET_LABELS)
        for name, matched in selectors:
            assert name in exported, f"{where}: quire exports no series {name!r}"
            available |= exported[name][1]
            assert matched <= available, f"{where}: {name} has no label(s) {matched - available}"
            used.add(name)
        assert grouping <= available, f"{where}: no label(s) {grouping - available} to group by"
    # What the dashboard is for: each of these must be on it.
    required = {
        "quire:time_to_first_token_seconds_bucket",
        "quire:inter_token_latency_seconds_bucket",
        "quire:e2e_request_latency_seconds_bucket",
        "quire:num_requests_waiting",
        "quire:kv_cache_usage_perc",
        "quire:prefix_cache_hits_total",
        "quire:prefix_cache_queries_total",
        "quire:generation_tokens_total",
        "quire:requests_rejected_total",
    }
    assert required <= used, f"missing from the dashboard: {sorted(required - used)}"


def test_dashboard_structure() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    text = DASHBOARD.read_text()
    referenced = set(re.findall(r"\$\{?([A-Za-z]\w*)", text))
    assert referenced <= variables, f"undefined variables: {sorted(referenced - variables)}"
    for panel in panels:
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid) and grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_queries_parse_as_promql() -> None:
    # A real PromQL parser (Prometheus' grammar, in Rust) when installed: every query must parse,
    # and its selectors must be the ones the check above read.
    promql_parser = pytest.importorskip("promql_parser")
    dashboard = json.loads(DASHBOARD.read_text())
    for where, expr in dashboard_queries(dashboard):
        # Grafana replaces its range variables before the query reaches Prometheus.
        ast = promql_parser.parse(expr.replace("$__rate_interval", "5m"))
        found: list[tuple[str, set[str]]] = []

        def visit(node: Any, found: list[tuple[str, set[str]]] = found) -> bool:
            if isinstance(node, promql_parser.VectorSelector):
                found.append((node.name, {m.name for m in node.matchers.matchers}))
            return True

        promql_parser.walk(ast, visit)
        assert sorted(found) == sorted(promql_parts(expr)[0]), where


def test_adapter_rule_queries_parse_as_promql() -> None:
    promql_parser = pytest.importorskip("promql_parser")
    for rule in adapter_rules():
        promql_parser.parse(rule["seriesQuery"])
        # Filled in the way the adapter fills its templates for a request about two pods.
        query = (
            rule["metricsQuery"]
            .replace("<<.Series>>", "quire:num_requests_waiting")
            .replace("<<.LabelMatchers>>", 'namespace="quire",pod=~"quire-a|quire-b"')
            .replace("<<.GroupBy>>", "pod")
        )
        assert "<<" not in query, f"unfilled template field in {rule['metricsQuery']}"
        promql_parser.parse(query)
