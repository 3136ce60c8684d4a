"""The HTTP ingress: OpenAI routes relayed to ``QuireReplica`` deployments, with retries.

Every request except the health probes, ``/metrics`` and ``/replicas`` is forwarded as it came (method,
path, headers, body) to a replica chosen by the deployment's request router, along with the
prompt's prefix block hashes (``prefix_key``) for a prefix-aware router to read. Status, headers
and body chunks are relayed back as they arrive; quire in the replica does all validation, so
errors are exactly what ``quire serve`` answers. The ingress itself only bounds the body
(``--max-body-bytes``: 413, ``--body-timeout``: 408) before reading it into memory, and answers
the probes from the replicas' reports: ``/health`` and ``/health/ready`` are 200 while at least
one replica is healthy, ``/health/live`` is 200 while the ingress runs (Serve replaces dead
replicas itself, so restarting the ingress would not help). Serve's own refusals (the queue of
``max_queued_requests`` full, the deployment unavailable) become quire's 503 with Retry-After.

Failures: the ingress holds a response until its first body byte has arrived. If the replica
dies before that (``RayActorError``: the actor died or became unreachable), nothing has reached
the client and the request is sent again, to another replica, up to ``max_attempts`` times with
a short backoff. After the first byte, a stream that breaks ends with an OpenAI-format error
event and ``data: [DONE]`` (SSE) so the client sees a clean end, never a hang.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry, Counter
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.responses import Response, StreamingResponse

from quire.server.auth import KeyRing
from quire.server.errors import APIError, openai_error, retry_after_header
from quire.server.settings import ServerSettings
from quire.server.sse import DONE, sse_event
from quire.server.state import RETRY_AFTER_S
from quire.serving.asgi_bridge import ForwardedRequest, ResponseStart
from quire.serving.prefix_key import (
    DEFAULT_BLOCK_CHARS,
    DEFAULT_MAX_BLOCKS,
    prefix_block_hashes,
    routing_text,
    tenant_namespace,
)
from quire.serving.ray_metrics import merge_expositions
from quire.serving.ray_router import PREFIX_KWARG

logger = logging.getLogger(__name__)

# Recomputed by the relay (Starlette sets them for the body it sends).
# x-request-id: Serve's proxy sets it (quire echoes the same id, which the proxy forwarded).
_HOP_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"connection", b"x-request-id"})
_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]


@dataclass(frozen=True)
class IngressConfig:
    """Relay knobs. ``max_attempts``: sends of one request when replicas die before answering."""

    max_attempts: int = 3
    retry_backoff_s: float = 0.2
    block_chars: int = DEFAULT_BLOCK_CHARS
    max_blocks: int = DEFAULT_MAX_BLOCKS

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.retry_backoff_s < 0:
            raise ValueError(f"retry_backoff_s must be >= 0, got {self.retry_backoff_s}")
        if self.block_chars < 1 or self.max_blocks < 0:
            raise ValueError("block_chars must be >= 1 and max_blocks >= 0")


class _RelayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.retries = Counter(
            "quire:ray_request_retries", "Requests re-sent after a replica failed before answering.",
            registry=self.registry,
        )  # fmt: skip
        self.broken_streams = Counter(
            "quire:ray_broken_streams", "Responses ended with an error because their replica failed mid-body.",
            registry=self.registry,
        )  # fmt: skip
        self.unserved = Counter(
            "quire:ray_requests_unserved", "Requests that failed on every attempt (503).",
            registry=self.registry,
        )  # fmt: skip


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    body = msgspec.json.encode(openai_error(status, message))
    return Response(body, status, headers=dict(headers or {}), media_type="application/json")


def _unavailable(message: str) -> Response:
    """quire's 503 for "try again shortly", with the Retry-After ``quire serve`` sends."""
    return _error(503, message, {"Retry-After": retry_after_header(RETRY_AFTER_S)})


def _api_error(error: APIError) -> Response:
    return Response(
        msgspec.json.encode(error.body()), error.status, headers=error.headers, media_type="application/json"
    )


def _sse_error(message: str) -> bytes:
    return sse_event(openai_error(503, message)) + DONE


def _serve_refusal(exc: BaseException) -> BaseException | None:
    """Serve's BackPressureError / DeploymentUnavailableError, raised as is or wrapped in a
    RayTaskError; None for anything else."""
    for candidate in (exc, getattr(exc, "cause", None)):
        if isinstance(candidate, (BackPressureError, DeploymentUnavailableError)):
            return candidate
    return None


class _BodyTooLarge(Exception):
    pass


@serve.ingress()
class QuireIngress:
    """Serve ingress deployment; constructed by Serve with handles to the replicas and the hub."""

    def __init__(
        self, replicas: Any, hub: Any, config: IngressConfig, settings: ServerSettings | None = None
    ) -> None:
        settings = settings or ServerSettings()
        self._replicas = replicas.options(stream=True)
        self._hub = hub
        self._config = config
        self._max_body_bytes = settings.max_body_bytes
        self._body_timeout = settings.body_timeout
        # The same keys as the replicas: /replicas needs one, and the prefix key is per tenant.
        self._keyring = KeyRing.from_sources(settings.api_keys, settings.api_key_file)
        self._namespace = settings.served_model_names[0] if settings.served_model_names else ""
        self._metrics = _RelayMetrics()

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = FastAPI(title="quire on Ray Serve", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/health/ready", self.health, methods=["GET"])
        app.add_api_route("/health/live", self.live, methods=["GET"])
        app.add_api_route("/metrics", self.metrics, methods=["GET"])
        app.add_api_route("/replicas", self.replica_list, methods=["GET"])
        app.add_api_route("/{path:path}", self.relay, methods=_METHODS)
        return app

    async def _reports(self) -> list[Any]:
        """The hub's live replica reports; none if the hub cannot answer within a few seconds."""
        try:
            return await asyncio.wait_for(self._hub.reports.remote(), timeout=5.0)
        except Exception as exc:  # the hub restarting: probes say "not ready" rather than 500
            logger.warning("the metrics hub did not answer: %r", exc)
            return []

    async def health(self) -> Response:
        """Ready (``/health``, ``/health/ready``): at least one replica reports healthy."""
        reports = await self._reports()
        if any(report.healthy for report in reports):
            return Response(status_code=200)
        return _unavailable("No replica is ready yet; retry shortly.")

    async def live(self) -> Response:
        """Live: the ingress answers. Replicas that die are Serve's to replace, not a reason to
        restart the ingress (which would also cut every stream it relays)."""
        return Response(status_code=200)

    async def metrics(self) -> Response:
        reports = await self._reports()
        body = merge_expositions([(r.replica, r.metrics_text) for r in reports], self._metrics.registry)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def replica_list(self, request: Request) -> Response:
        """The replicas and their health; with API keys configured, only for a valid key (the
        check the replicas make). No pids: nothing a client could use."""
        try:
            self._keyring.require(request.headers.get("authorization"))
        except APIError as error:
            return _api_error(error)
        reports = await self._reports()
        rows = [{"replica": r.replica, "healthy": r.healthy} for r in reports]
        return Response(msgspec.json.encode({"replicas": rows}), media_type="application/json")

    async def _read_body(self, request: Request) -> bytes:
        """The body, never more than ``--max-body-bytes`` of it in memory (``_BodyTooLarge``),
        within ``--body-timeout`` (``TimeoutError``)."""
        limit = self._max_body_bytes
        chunks: list[bytes] = []
        size = 0
        async with asyncio.timeout(self._body_timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _BodyTooLarge
                chunks.append(chunk)
        return b"".join(chunks)

    async def relay(self, request: Request) -> Response:
        limit = self._max_body_bytes
        too_large = f"The request body exceeds the server's limit of {limit} bytes."
        length = request.headers.get("content-length")
        if length is not None:
            if not (length.isascii() and length.isdigit()):
                return _error(400, "The Content-Length header is not a valid number.")
            if int(length) > limit:  # refused before reading any of it
                return _error(413, too_large)
        try:
            body = await self._read_body(request)
        except _BodyTooLarge:
            return _error(413, too_large)
        except TimeoutError:
            return _error(408, f"The request body did not arrive within {self._body_timeout:g} s.")
        forwarded = ForwardedRequest(
            method=request.method,
            path=request.url.path,
            query_string=request.url.query.encode(),
            headers=tuple((k.lower(), v) for k, v in request.headers.raw),
            body=body,
            client=(request.client.host, request.client.port) if request.client else None,
        )
        return await self._send(forwarded, self._prefix_hashes(body, request.headers.get("authorization")))

    def _tenant_namespace(self, authorization: str | None) -> str:
        tenant = self._keyring.authenticate(authorization)
        return tenant_namespace(self._namespace, tenant.cache_salt if tenant is not None else None)

    def _prefix_hashes(self, body: bytes, authorization: str | None = None) -> tuple[str, ...]:
        try:
            parsed = json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError):
            return ()  # the replica answers the 400
        cfg = self._config
        return prefix_block_hashes(
            routing_text(parsed),
            block_chars=cfg.block_chars,
            max_blocks=cfg.max_blocks,
            namespace=self._tenant_namespace(authorization),
        )

    async def _send(self, forwarded: ForwardedRequest, hashes: tuple[str, ...]) -> Response:
        cfg = self._config
        for attempt in range(1, cfg.max_attempts + 1):
            stream = self._replicas.forward.remote(forwarded, **{PREFIX_KWARG: hashes})
            try:
                start, body, is_sse = await self._open(stream)
            except (RayActorError, StopAsyncIteration) as exc:
                stream.cancel()
                logger.warning(
                    "replica failed before answering (attempt %d/%d): %r", attempt, cfg.max_attempts, exc
                )
                if attempt < cfg.max_attempts:
                    self._metrics.retries.inc()
                    await asyncio.sleep(cfg.retry_backoff_s * attempt)
                continue
            except Exception as exc:
                stream.cancel()
                refusal = _serve_refusal(exc)
                if refusal is not None:  # Serve's queue is full, or no replica can be deployed
                    logger.warning("Ray Serve refused a request: %s", refusal)
                    self._metrics.unserved.inc()
                    return _unavailable("The server is overloaded or not ready; retry shortly.")
                # A bug, not a lost replica: retrying would fail the same way.
                logger.exception("relaying %s %s failed", forwarded.method, forwarded.path)
                return _error(500, "The server had an internal error; see the ingress log.")
            except BaseException:  # the client left (CancelledError) while we waited: stop the work
                stream.cancel()
                raise
            headers = {
                k.decode("latin-1"): v.decode("latin-1") for k, v in start.headers if k not in _HOP_HEADERS
            }
            if not is_sse:
                return Response(body, start.status, headers=headers)
            return StreamingResponse(self._rest(stream, body), start.status, headers=headers)
        self._metrics.unserved.inc()
        return _unavailable(
            f"No replica could serve the request after {cfg.max_attempts} attempts; retry shortly."
        )

    @staticmethod
    async def _open(stream: Any) -> tuple[ResponseStart, bytes, bool]:
        """The response start and what the client may be sent before committing to this replica:
        the whole body of a plain response, the first chunk of an event stream."""
        start = await stream.__anext__()
        if not isinstance(start, ResponseStart):
            raise TypeError(f"a replica answered {type(start).__name__} before its response start")
        is_sse = any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in start.headers)
        if is_sse:
            try:
                return start, await stream.__anext__(), True
            except StopAsyncIteration:
                return start, b"", True
        return start, b"".join([chunk async for chunk in stream]), False

    async def _rest(self, stream: Any, first: bytes) -> AsyncIterator[bytes]:
        yield first
        try:
            async for chunk in stream:
                yield chunk
        except Exception as exc:  # any failure: the client still gets an error event and [DONE]
            self._metrics.broken_streams.inc()
            logger.warning("replica failed mid-response: %r", exc)
            yield _sse_error("The replica serving this request failed; the response is incomplete.")
        finally:
            stream.cancel()  # the client left early, or we are done: stop the replica's work
