"""The Ray Serve application: ingress -> replicas (one quire engine each) + metrics hub.

``build_app(RayAppConfig)`` returns the bound application for ``serve.run``;
``app_builder(args)`` is the same from a plain dict, for ``serve run deploy/ray/serve_config.yaml``
(``import_path: quire.serving.ray_app:app_builder``).

Autoscaling maps the seeds' "target queue depth per replica" onto Ray Serve's
``target_ongoing_requests``: Serve counts a replica's *ongoing* requests, which for quire are the
requests running in its batch plus those waiting in its queue. A target queue depth ``Q`` per
replica is therefore ``target_ongoing_requests = max_num_seqs + Q``; the default ``Q = 0`` asks
for a new replica as soon as the replicas' batches are full on average. ``max_ongoing_requests``
(default ``2 * max_num_seqs``) caps what one replica accepts; beyond it requests wait in Serve's
router, where any replica (and the prefix router's choice) can still take them.

Backpressure: Serve's router queue is unbounded by default, so quire's ``--max-waiting`` would
never fire. The replicas' ``max_queued_requests`` is set from it: at most ``max_waiting``
requests wait in the ingress's router (one ingress, so this bounds the whole application) beyond
those the replicas have accepted; more get Serve's ``BackPressureError``, which the ingress
answers with quire's 503 and ``Retry-After``. Each replica's own queue (up to
``max_ongoing_requests - max_num_seqs``) keeps quire's ``--max-waiting`` check as well.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from quire.config import EngineArgs
from quire.frontend.process_client import SHUTDOWN_WAIT_S
from quire.server.serve import FAIL_FLUSH_S
from quire.server.settings import ServerSettings
from quire.serving.ray_ingress import IngressConfig

APP_NAME = "quire"


@dataclass(frozen=True)
class AutoscalingSpec:
    """Replica count bounds and the per-replica load target (``None``: ``max_num_seqs``)."""

    min_replicas: int = 1
    max_replicas: int = 4
    initial_replicas: int | None = None
    target_ongoing_requests: float | None = None
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 60.0

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < 1 or self.min_replicas > self.max_replicas:
            raise ValueError(
                f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                f"{self.min_replicas}..{self.max_replicas}"
            )
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError(f"initial_replicas must lie in min..max replicas, got {initial}")
        if self.target_ongoing_requests is not None and not self.target_ongoing_requests > 0:
            raise ValueError(f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests}")

    def to_ray(self, max_num_seqs: int) -> dict[str, Any]:
        """Serve's ``autoscaling_config``; the default target is a full batch and an empty queue."""
        target = self.target_ongoing_requests or float(max_num_seqs)
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "initial_replicas": self.initial_replicas,
            "target_ongoing_requests": target,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
        }


def _prefix_router(config: RayAppConfig) -> Any:
    from ray.serve.config import RequestRouterConfig

    from quire.serving.ray_router import PrefixAwareRequestRouter

    kwargs = {"imbalance_ratio": config.imbalance_ratio, "imbalance_slack": config.prefix_imbalance_slack}
    return RequestRouterConfig(request_router_class=PrefixAwareRequestRouter, request_router_kwargs=kwargs)


def _ray_default_router(config: RayAppConfig) -> Any:
    from ray.serve.config import RequestRouterConfig

    return RequestRouterConfig()  # Serve's PowerOfTwoChoicesRequestRouter


# --router NAME -> the deployment's RequestRouterConfig.
ROUTERS: Mapping[str, Callable[[RayAppConfig], Any]] = {"prefix": _prefix_router, "pow2": _ray_default_router}


@dataclass(frozen=True)
class RayAppConfig:
    """Everything the application needs; ``autoscaling`` replaces the fixed ``num_replicas``."""

    engine_args: EngineArgs = field(default_factory=EngineArgs)
    settings: ServerSettings = field(default_factory=ServerSettings)
    num_replicas: int = 2
    autoscaling: AutoscalingSpec | None = None
    router: str = "prefix"
    replica_num_cpus: float = 0.5
    max_ongoing_requests: int | None = None
    imbalance_ratio: float = 2.0
    imbalance_slack: int | None = None
    ingress: IngressConfig = field(default_factory=IngressConfig)
    # --log-level for quire's loggers in every replica (the CLI's setting stays in the driver).
    log_level: str = "WARNING"

    def __post_init__(self) -> None:
        _check_supported(self.settings)
        # Bad cache options (kv_cache_memory, kv_cache_dtype) fail here, once, not in every replica.
        self.engine_args.cache_config()
        if not isinstance(logging.getLevelName(str(self.log_level).upper()), int):
            raise ValueError(
                f"log_level must be a logging level name (e.g. INFO, WARNING), got {self.log_level!r}"
            )
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas}")
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router {self.router!r}; choose one of: {', '.join(ROUTERS)}")
        if not self.replica_num_cpus >= 0:
            raise ValueError(f"replica_num_cpus must be >= 0, got {self.replica_num_cpus}")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < 1:
            raise ValueError(f"max_ongoing_requests must be >= 1, got {self.max_ongoing_requests}")
        if self.imbalance_slack is not None and self.imbalance_slack < 0:
            raise ValueError(f"imbalance_slack must be >= 0, got {self.imbalance_slack}")

    @property
    def prefix_imbalance_slack(self) -> int:
        """How many more ongoing requests than the least-loaded replica a prefix owner may have
        (before the ratio rule): by default a whole batch, ``max_num_seqs``, so a request leaves
        its prefix's owner only when the owner would queue it behind a full batch while another
        replica could run it at once. Recomputing a long prefix elsewhere also evicts that
        replica's own cached prefixes. On benchmarks/prefix_routing.py (SmolLM2-135M, batch 8,
        concurrency 8, 3 rounds pooled) a slack of 8 kept the hit rate at 0.78-0.82 per round,
        the workload's ceiling (0.82: 8 cold misses in 64), where 4 gave 0.70."""
        if self.imbalance_slack is not None:
            return self.imbalance_slack
        return self.engine_args.max_num_seqs

    @property
    def replica_max_ongoing(self) -> int:
        return self.max_ongoing_requests or 2 * self.engine_args.max_num_seqs

    @property
    def max_queued_requests(self) -> int:
        """Serve's bound on requests waiting in the ingress's router: ``--max-waiting`` (see the
        module docstring). Serve takes -1 (unbounded) or >= 1, so ``--max-waiting 0`` becomes 1."""
        return max(1, self.settings.max_waiting)

    @property
    def graceful_shutdown_timeout_s(self) -> float:
        """Serve's budget for a replica's whole stop, after which it kills the actor: its drain
        *and* ``__del__`` (Ray 2.60). So ``--shutdown-timeout`` for the drain, plus what
        ``quire serve`` allows after it: ``FAIL_FLUSH_S`` for requests failed with the shutdown
        error to send it, and ``SHUTDOWN_WAIT_S`` for the engine process to exit."""
        return self.settings.shutdown_timeout + FAIL_FLUSH_S + SHUTDOWN_WAIT_S

    def scaling_options(self) -> dict[str, Any]:
        if self.autoscaling is None:
            return {"num_replicas": self.num_replicas}
        return {"autoscaling_config": self.autoscaling.to_ray(self.engine_args.max_num_seqs)}


def _check_supported(settings: ServerSettings) -> None:
    """Refuse the server settings that cannot apply on Ray Serve (its proxy owns the socket),
    rather than accept and ignore them. Whatever the source: CLI flags or serve_config.yaml."""
    if settings.ssl_keyfile or settings.ssl_certfile:
        raise ValueError(
            "TLS (--ssl-keyfile/--ssl-certfile, server.ssl_keyfile/ssl_certfile) is not supported on "
            "Ray Serve; terminate TLS in front of it (e.g. nginx)"
        )
    if settings.root_path:
        raise ValueError(
            "--root-path (server.root_path) is not supported on Ray Serve; set the application's "
            "route_prefix instead"
        )
    default = ServerSettings()
    if settings.header_timeout != default.header_timeout:
        raise ValueError(
            "--header-timeout (server.header_timeout) is not supported on Ray Serve: its HTTP proxy "
            "reads the headers; configure its http_options (keep_alive_timeout_s) instead"
        )


def _resolved(config: RayAppConfig) -> tuple[EngineArgs, ServerSettings]:
    """Resolve the default model and the served names here, once, so every replica (a separate
    process, maybe on another machine) loads the same thing whatever its environment says."""
    from quire.frontend.core_builder import resolve_model_path
    from quire.server.serve import default_model_name

    args = config.engine_args
    names = config.settings.served_model_names or (default_model_name(args),)
    args = dataclasses.replace(args, model=resolve_model_path(args), show_progress=False)
    return args, dataclasses.replace(config.settings, served_model_names=names)


def build_app(config: RayAppConfig) -> Any:
    """The bound Serve application (pass to ``serve.run``)."""
    from ray import serve

    from quire.serving.ray_ingress import QuireIngress
    from quire.serving.ray_replica import MetricsHub, QuireReplica

    args, settings = _resolved(config)
    hub = serve.deployment(
        MetricsHub,
        name="QuireMetricsHub",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        logging_config={"enable_access_log": False},  # two reports a second per replica
    ).bind()
    replicas = serve.deployment(
        QuireReplica,
        name="QuireReplica",
        ray_actor_options={"num_cpus": config.replica_num_cpus},
        max_ongoing_requests=config.replica_max_ongoing,
        request_router_config=ROUTERS[config.router](config),
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
        max_queued_requests=config.max_queued_requests,
        **config.scaling_options(),
    ).bind(args, settings, hub, config.log_level)
    ingress = serve.deployment(
        QuireIngress,
        name="QuireIngress",
        num_replicas=1,
        max_ongoing_requests=100_000,  # it only relays; the replicas' limits apply
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(replicas, hub, config.ingress, settings)


def _sub(cls: type, values: Mapping[str, Any] | None, what: str) -> Any:
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {what} field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**values)


def config_from_dict(args: Mapping[str, Any]) -> RayAppConfig:
    """A ``RayAppConfig`` from a Serve config file's ``args`` (nested dicts, plain values)."""
    args = dict(args)
    engine = dict(args.pop("engine", None) or {})
    if "model" in args:
        engine["model"] = args.pop("model")
    server = dict(args.pop("server", None) or {})
    for key in ("served_model_names", "api_keys", "allowed_origins", "allowed_methods", "allowed_headers"):
        if key in server and isinstance(server[key], list):
            server[key] = tuple(server[key])
    autoscaling = args.pop("autoscaling", None)
    ingress = args.pop("ingress", None)  # before **args below, which must not carry it again
    return _sub(
        RayAppConfig,
        {
            **args,
            "engine_args": _sub(EngineArgs, engine, "engine"),
            "settings": _sub(ServerSettings, server, "server"),
            "autoscaling": _sub(AutoscalingSpec, autoscaling, "autoscaling") if autoscaling else None,
            "ingress": _sub(IngressConfig, ingress, "ingress"),
        },
        "application argument",
    )


def app_builder(args: dict[str, Any]) -> Any:
    """Serve's application builder (``import_path: quire.serving.ray_app:app_builder``)."""
    return build_app(config_from_dict(args))
