"""What every route shares: the engine client, the policy objects, and the server's lifecycle.

One ``ServerState`` per app, stored on ``app.state.quire``; no module-level state, so several apps
can live in one process (tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.requests import Request

from quire.frontend.async_client import EngineClient
from quire.server.auth import KeyRing, Tenant
from quire.server.errors import APIError
from quire.server.metrics import RequestTimings, ServerMetrics
from quire.server.ratelimit import RateLimiter, RateLimits
from quire.server.request_log import RequestLogger
from quire.server.settings import ServerSettings
from quire.server.supervisor import EngineSupervisor, RestartBudget

# How long clients are told to wait on a 503 (loading, draining, queue full).
RETRY_AFTER_S = 1.0


class Failable(Protocol):
    """What ``fail_in_flight`` needs of a running request (``serving.Generation``)."""

    def fail(self, error: BaseException) -> None: ...


@dataclass
class RequestContext:
    """Facts about one HTTP request, filled in by the route, logged by the edge middleware."""

    request_id: str
    endpoint: str
    tenant: str = "-"
    auth: Tenant | None = None  # set by the edge middleware on authenticated paths
    model: str = ""
    stream: bool | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    timings: RequestTimings | None = None
    # Overrides the HTTP status in the log line: a streamed response is 200 once headers are sent,
    # yet may end in a timeout (504) or a client disconnect (499).
    status: int | None = None
    prompt_text: Any = None  # logged only with --log-prompts
    completion_text: Any = None


class ServerState:
    """The engine client plus auth, rate limits, metrics, request logging and drain state."""

    def __init__(
        self,
        settings: ServerSettings,
        client: EngineClient,
        model_names: tuple[str, ...],
        model_path: str,
        max_num_seqs: int,
    ) -> None:
        if not model_names:
            raise ValueError("at least one served model name is needed")
        self.settings = settings
        self.client = client
        self.model_names = model_names
        self.model_name = model_names[0]
        self.model_path = model_path
        self.max_num_seqs = max_num_seqs
        self.metrics = ServerMetrics(self.model_name)
        default_limits = RateLimits(
            requests_per_minute=settings.requests_per_minute, tokens_per_minute=settings.tokens_per_minute
        )
        self.keyring = KeyRing.from_sources(
            settings.api_keys, settings.api_key_file, default_limits=default_limits
        )
        self.limiter = RateLimiter(self.keyring.limits_for)
        self.request_logger = RequestLogger(log_prompts=settings.log_prompts)
        self.created = int(time.time())
        self.draining = False
        self._body_reads: set[asyncio.Timeout] = set()  # see reading_body()
        self.in_flight = 0  # HTTP requests being served (health and metrics excluded)
        # Every running Generation (added by admission.submit, removed when it closes), so that a
        # shutdown can end each with an error its client sees instead of a cut connection.
        self.live_generations: set[Failable] = set()
        self.load_error: str | None = None
        self.on_ready: list[Callable[[], None]] = []
        self.on_fatal: list[Callable[[str], None]] = []
        self.supervisor = EngineSupervisor(
            client,
            RestartBudget(settings.max_engine_restarts, settings.engine_restart_window),
            on_fatal=self._fatal,
            on_restart=self.metrics.inc_engine_restarts,
            stopping=lambda: self.draining,
        )

    async def start_engine(self) -> None:
        """Load the engine in the background: /health says 503 until this finishes."""
        try:
            await self.client.start()
        except Exception as exc:  # the client has logged why; the server decides what to do
            self.load_error = str(exc)
            self._fatal(self.load_error)
            return
        self.client.add_stats_listener(self.metrics.observe_step)
        self.supervisor.watch()
        for callback in self.on_ready:
            callback()

    @contextlib.asynccontextmanager
    async def reading_body(self) -> AsyncIterator[None]:
        """Bound a request-body read by ``--body-timeout`` (raises ``TimeoutError``); a drain
        ends every such read at once, since no work has started for those requests yet."""
        async with asyncio.timeout(self.settings.body_timeout) as timeout:
            self._body_reads.add(timeout)
            try:
                yield
            finally:
                self._body_reads.discard(timeout)

    def start_drain(self) -> None:
        """Refuse new requests from now on, and stop waiting for bodies still being sent."""
        self.draining = True
        if self._body_reads:
            now = asyncio.get_running_loop().time()
            for timeout in self._body_reads:
                timeout.reschedule(now)

    async def stop_engine(self) -> None:
        """Stop supervising (cancelling a restart under way), then shut the engine down."""
        await self.supervisor.stop()
        await self.client.shutdown()

    def _fatal(self, message: str) -> None:
        for callback in self.on_fatal:
            callback(message)

    @property
    def healthy(self) -> bool:
        """Ready for requests (``/health``, ``/health/ready``): engine up, not draining."""
        return self.client.is_ready and not self.draining

    @property
    def alive(self) -> bool:
        """The process can still serve, now or after a restart (``/health/live``): false only once
        the engine is gone for good and the server is about to exit."""
        return self.load_error is None and self.supervisor.fatal_error is None

    def unavailable_reason(self) -> str | None:
        """Why requests cannot be served right now, or None."""
        if self.draining:
            return "The server is shutting down and accepts no new requests."
        if self.load_error is not None:
            return f"The engine is not running: {self.load_error}"
        if self.supervisor.fatal_error is not None:
            return f"The engine is not running: {self.supervisor.fatal_error}"
        if self.supervisor.restarting:
            return "The engine is restarting after a failure; retry shortly."
        if self.client.dead_reason is not None or (self.client.info is not None and not self.client.is_ready):
            return f"The engine is not running: {self.client.dead_reason or 'it exited'}"
        if not self.client.is_ready:
            return "The model is still loading; retry shortly."
        return None

    def engine(self) -> EngineClient:
        """The ready engine client, or a 503 ``APIError`` saying why not."""
        reason = self.unavailable_reason()
        if reason is not None:
            raise APIError.overloaded(reason, retry_after_s=RETRY_AFTER_S)
        return self.client

    def fail_in_flight(self, error: BaseException) -> int:
        """End every running request with ``error`` (each answers its client with it); returns
        how many there were."""
        live = list(self.live_generations)
        for generation in live:
            generation.fail(error)
        return len(live)

    async def fail_in_flight_and_flush(self, error: BaseException, flush_s: float) -> int:
        """``fail_in_flight``, then wait up to ``flush_s`` for those requests to send their error
        (a last SSE event and [DONE] for streams) before the caller closes connections."""
        failed = self.fail_in_flight(error)
        if failed:
            deadline = time.monotonic() + flush_s
            while self.in_flight > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        return failed

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names:
            self.metrics.inc_rejected("not_found")
            raise APIError.model_not_found(model)

    def authenticate(self, authorization: str | None) -> Tenant:
        """The caller's tenant, or the 401 ``APIError`` (counted as rejected)."""
        tenant = self.keyring.authenticate(authorization)
        if tenant is None:
            self.metrics.inc_rejected("unauthorized")
            return self.keyring.require(authorization)  # raises the 401 that says what was wrong
        return tenant


def server_state(request: Request) -> ServerState:
    return request.app.state.quire


def context(request: Request) -> RequestContext:
    """The request's context, made by the edge middleware (or a bare one in unit tests)."""
    ctx = getattr(request.state, "quire", None)
    if ctx is None:
        ctx = RequestContext(request_id="-", endpoint=request.url.path)
        request.state.quire = ctx
    return ctx
