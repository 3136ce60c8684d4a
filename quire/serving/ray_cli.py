"""``quire serve MODEL --replicas N``: the same OpenAI server, as N replicas on Ray Serve.

Starts a local Ray instance (or joins the cluster in ``RAY_ADDRESS``), deploys the application of
``ray_app`` with Serve's HTTP proxy on ``--host``/``--port``, prints the address and ``ready``
once every replica has loaded its engine, and blocks. SIGTERM or Ctrl-C: the application is
deleted (replicas drain their requests for up to ``--shutdown-timeout`` and stop their engines),
Serve and Ray are shut down if this command started them, and the process exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import threading
from types import FrameType
from typing import TYPE_CHECKING

from quire.config import EngineArgs
from quire.server.settings import ServerSettings

if TYPE_CHECKING:
    from quire.serving.ray_app import RayAppConfig


def add_replica_arguments(parser: argparse.ArgumentParser) -> None:
    """The scale-out flags of ``quire serve``; without ``--replicas`` none of them applies."""
    group = parser.add_argument_group("scale-out on Ray Serve (with --replicas)")
    group.add_argument(
        "--replicas", type=int, default=None, help="serve N engine replicas on Ray Serve behind one ingress"
    )
    group.add_argument(
        "--max-replicas", type=int, default=None, help="autoscale between --min-replicas and this"
    )
    # None rather than a default, so that giving them without --max-replicas can be refused.
    group.add_argument(
        "--min-replicas", type=int, default=None, help="autoscaling floor (default 1; needs --max-replicas)"
    )
    group.add_argument(
        "--target-ongoing-requests",
        type=float,
        default=None,
        help="autoscaling target per replica: running + queued requests (default --max-num-seqs, "
        "i.e. a target queue depth of 0; add the queue depth you accept; needs --max-replicas)",
    )
    group.add_argument(
        "--router",
        default=None,
        choices=["prefix", "pow2"],
        help="prefix (default): prompts sharing a prefix go to the replica that served it; pow2: Ray's default",
    )
    group.add_argument(
        "--replica-cpus", type=float, default=None, help="Ray CPUs reserved per replica (default 0.5)"
    )
    group.add_argument(
        "--max-ongoing-requests",
        type=int,
        default=None,
        help="requests one replica accepts at once (default 2 x --max-num-seqs); more wait in Serve",
    )


# Every flag above defaults to None so that one given without --replicas/--max-replicas (which
# would otherwise be ignored by the single-process server) can be refused.
_SCALE_OUT_ONLY = {
    "min_replicas": "--min-replicas",
    "target_ongoing_requests": "--target-ongoing-requests",
    "router": "--router",
    "replica_cpus": "--replica-cpus",
    "max_ongoing_requests": "--max-ongoing-requests",
}


def wants_ray(ns: argparse.Namespace) -> bool:
    """Whether ``quire serve`` runs on Ray Serve; a ValueError for scale-out flags without it."""
    if ns.replicas is not None or ns.max_replicas is not None:
        return True
    given = [flag for name, flag in _SCALE_OUT_ONLY.items() if getattr(ns, name, None) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} only apply with --replicas N (or --max-replicas N)")
    return False


def app_config_from(args: EngineArgs, settings: ServerSettings, ns: argparse.Namespace) -> RayAppConfig:
    from quire.serving.ray_app import AutoscalingSpec, RayAppConfig

    if ns.replicas is not None and ns.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {ns.replicas}")
    autoscaling = None
    if ns.max_replicas is None:
        given = [
            flag
            for flag, value in (
                ("--min-replicas", ns.min_replicas),
                ("--target-ongoing-requests", ns.target_ongoing_requests),
            )
            if value is not None
        ]
        if given:
            raise ValueError(f"{' and '.join(given)} only apply to autoscaling: add --max-replicas N")
    else:
        autoscaling = AutoscalingSpec(
            min_replicas=1 if ns.min_replicas is None else ns.min_replicas,
            max_replicas=ns.max_replicas,
            initial_replicas=ns.replicas,
            target_ongoing_requests=ns.target_ongoing_requests,
        )
    return RayAppConfig(
        engine_args=args,
        settings=settings,
        num_replicas=ns.replicas or 1,
        autoscaling=autoscaling,
        router=ns.router or "prefix",
        replica_num_cpus=0.5 if ns.replica_cpus is None else ns.replica_cpus,
        max_ongoing_requests=ns.max_ongoing_requests,
        log_level=getattr(ns, "log_level", "WARNING"),
    )


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def serve_on_ray(args: EngineArgs, settings: ServerSettings, ns: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    import ray
    from ray import serve

    from quire.serving.ray_app import APP_NAME, build_app

    config = app_config_from(args, settings, ns)  # validated here, before Ray starts
    port = settings.port or _free_port(settings.host)
    joined = bool(os.environ.get("RAY_ADDRESS"))
    if joined:
        ray.init()
    else:
        ray.init(include_dashboard=False)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        serve.start(http_options={"host": settings.host, "port": port})
        print(
            f"quire: listening on http://{settings.host}:{port} (Ray Serve; /health is 503 until ready)",
            flush=True,
        )
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        print(f"quire: {describe(config)}\nquire: ready", flush=True)
        while not stop.wait(1.0):
            pass
        print("quire: shutting down", flush=True)
    finally:
        serve.delete(APP_NAME)
        if not joined:
            serve.shutdown()
            ray.shutdown()
    return 0


def describe(config: RayAppConfig) -> str:
    scaling = config.scaling_options()
    replicas = scaling.get("num_replicas") or "autoscaling {min_replicas}..{max_replicas}, target {t}".format(
        t=scaling["autoscaling_config"]["target_ongoing_requests"], **scaling["autoscaling_config"]
    )
    return f"{replicas} replica(s), router {config.router}"
