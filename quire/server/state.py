"""What every route shares: the engine client, the policy objects, and the server's lifecycle.

One ``ServerState`` per app, stored on ``app.state.quire``; no module-level state, so several apps
can live in one process (tests).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from quire.frontend.async_client import EngineClient
from quire.server.auth import KeyRing, Tenant
from quire.server.errors import APIError
from quire.server.metrics import RequestTimings, ServerMetrics
from quire.server.ratelimit import RateLimiter, RateLimits
from quire.server.request_log import RequestLogger
from quire.server.settings import ServerSettings

# How long clients are told to wait on a 503 (loading, draining, queue full).
RETRY_AFTER_S = 1.0


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
        self.in_flight = 0  # HTTP requests being served (health and metrics excluded)
        self.load_error: str | None = None
        self.on_ready: list[Callable[[], None]] = []
        self.on_fatal: list[Callable[[str], None]] = []

    async def start_engine(self) -> None:
        """Load the engine in the background: /health says 503 until this finishes."""
        try:
            await self.client.start()
        except Exception as exc:  # the client has logged why; the server decides what to do
            self.load_error = str(exc)
            for callback in self.on_fatal:
                callback(self.load_error)
            return
        self.client.add_stats_listener(self.metrics.observe_step)
        for callback in self.on_ready:
            callback()

    @property
    def healthy(self) -> bool:
        return self.client.is_ready and not self.draining

    def unavailable_reason(self) -> str | None:
        """Why requests cannot be served right now, or None."""
        if self.draining:
            return "The server is shutting down and accepts no new requests."
        if self.load_error is not None:
            return f"The engine is not running: {self.load_error}"
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
