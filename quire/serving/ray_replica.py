"""The Ray Serve deployments behind the ingress: ``QuireReplica`` and ``MetricsHub``.

Each ``QuireReplica`` is a whole ``quire serve`` minus the socket: quire's own FastAPI app over a
``ProcessEngineClient`` (the engine core in a child process, supervised as usual), called
in-process through ``asgi_bridge`` for every forwarded request. Its async constructor runs the
app's lifespan and returns only once the engine is loaded, so Serve counts the replica as
running exactly when it can serve; ``check_health`` fails once quire has given up on its engine,
and Serve then replaces the replica.

Metrics: every replica pushes its Prometheus exposition (and pid, readiness) to the one
``MetricsHub`` twice a second; the ingress reads the hub for ``/metrics``, ``/health`` and
``/replicas``. Push rather than pull because a Serve handle routes each call to *some* replica,
with no way to address each one; a replica that died simply stops reporting and ages out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from quire.config import EngineArgs
from quire.server.openai.serving import ServerShutdown
from quire.server.serve import FAIL_FLUSH_S, make_server_state
from quire.server.settings import ServerSettings
from quire.serving.asgi_bridge import ForwardedRequest, Lifespan, ResponseStart, call_app

logger = logging.getLogger(__name__)

REPORT_PERIOD_S = 0.5
REPLICA_HEADER = "x-quire-replica"


@dataclass(frozen=True)
class ReplicaReport:
    """What one replica last told the hub."""

    replica: str
    pid: int
    engine_pid: int | None
    healthy: bool
    metrics_text: str
    reported_at: float


def configure_logging(log_level: str) -> None:
    """``--log-level`` for quire's loggers in this replica process, and the per-request log line,
    which ``quire serve`` writes whatever the level (the CLI sets both only in the driver).
    A handler only if Ray gave the worker none, so lines go to the worker's log as usual."""
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("quire").setLevel(log_level.upper())
    logging.getLogger("quire.requests").setLevel(logging.INFO)


class QuireReplica:
    """One quire engine and its OpenAI app; ``forward`` streams a forwarded request's response."""

    async def __init__(
        self, engine_args: EngineArgs, settings: ServerSettings, hub: Any = None, log_level: str = "WARNING"
    ) -> None:
        from ray import serve

        from quire.server.app import build_app

        configure_logging(log_level)
        self._hub = hub
        self._reporter: asyncio.Future[None] | None = None
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.state = make_server_state(engine_args, settings, log_level)
        self.app = build_app(self.state)
        self._lifespan = Lifespan(self.app)
        await self._lifespan.startup()  # starts loading the engine in the background
        try:
            await self._wait_ready(settings.engine_load_timeout)
        except BaseException:
            await self._lifespan.shutdown()  # no engine process may outlive a failed start
            raise
        if hub is not None:
            self._reporter = asyncio.ensure_future(self._report_forever())
        logger.info("replica %s ready (pid %d, engine pid %s)", self.replica_id, os.getpid(), self.engine_pid)

    @property
    def engine_pid(self) -> int | None:
        return getattr(self.state.client, "pid", None)

    async def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.state.client.is_ready:
            failure = self.state.load_error or self.state.supervisor.fatal_error
            if failure is not None:
                raise RuntimeError(f"the quire engine failed to start: {failure}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the quire engine did not load within {timeout:.0f} s")
            await asyncio.sleep(0.05)

    async def forward(
        self, request: ForwardedRequest, prefix_hashes: tuple[str, ...] = ()
    ) -> AsyncIterator[Any]:
        """The response to ``request``: a ``ResponseStart`` then body chunks. ``prefix_hashes`` is
        only for the request router, which reads it from the pending request."""
        async for item in call_app(self.app, request):
            if isinstance(item, ResponseStart):
                item = item.with_header(REPLICA_HEADER, self.replica_id)
            yield item

    def report(self) -> ReplicaReport:
        body, _ = self.state.metrics.render()
        return ReplicaReport(
            replica=self.replica_id,
            pid=os.getpid(),
            engine_pid=self.engine_pid,
            healthy=self.state.healthy,
            metrics_text=body.decode(),
            reported_at=time.time(),
        )

    async def _report_forever(self) -> None:
        while True:
            try:
                await self._hub.put.remote(self.report())
            except Exception as exc:  # the hub restarting must not kill the replica
                logger.warning("could not report to the metrics hub: %r", exc)
            await asyncio.sleep(REPORT_PERIOD_S)

    async def check_health(self) -> None:
        """Serve's health probe: fail once quire has given up on its engine (Serve replaces us)."""
        if not self.state.alive:
            raise RuntimeError(f"the quire engine is gone: {self.state.unavailable_reason()}")

    async def __del__(self) -> None:
        # Serve calls this on a graceful stop (scale-down, redeploy, shutdown).
        if getattr(self, "_lifespan", None) is None:
            return
        if self._reporter is not None:
            self._reporter.cancel()
        if self._hub is not None:
            # Best effort, bounded: the hub may be stopping too (app deleted), and a report it
            # never gets ages out anyway.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._hub.drop.remote(self.replica_id), timeout=1.0)
        # Serve's drain has waited for its ongoing requests, but some may still run here (sent
        # after the drain by a router that had not heard of it yet, or not yet closed in quire).
        # They end with quire's shutdown error (an SSE error event and [DONE], or a 503), as in
        # `quire serve` after --shutdown-timeout, rather than being cut when the engine stops;
        # ray_app's graceful_shutdown_timeout_s leaves time for this and the engine's exit.
        self.state.start_drain()
        await self.state.fail_in_flight_and_flush(ServerShutdown(), FAIL_FLUSH_S)
        await self._lifespan.shutdown()  # stops the engine process


class MetricsHub:
    """The latest ``ReplicaReport`` of every live replica; reports older than ``ttl_s`` are dropped."""

    def __init__(self, ttl_s: float = 3.0) -> None:
        if not ttl_s > REPORT_PERIOD_S:
            raise ValueError(f"ttl_s must exceed the report period ({REPORT_PERIOD_S} s), got {ttl_s}")
        self.ttl_s = ttl_s
        self._reports: dict[str, ReplicaReport] = {}

    # async: Ray runs an actor's sync methods in a thread pool, where these would race on the
    # dict; async methods all run on the actor's one event loop.
    async def put(self, report: ReplicaReport) -> None:
        self._reports[report.replica] = report

    async def drop(self, replica: str) -> None:
        self._reports.pop(replica, None)

    async def reports(self) -> list[ReplicaReport]:
        cutoff = time.time() - self.ttl_s
        for replica in [r for r, rep in self._reports.items() if rep.reported_at < cutoff]:
            del self._reports[replica]
        return sorted(self._reports.values(), key=lambda report: report.replica)
