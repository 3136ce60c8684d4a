"""The edge: request ids, body size limit, draining, in-flight counting and the request log line.

A plain ASGI middleware rather than Starlette's ``BaseHTTPMiddleware``: that one runs the route in
a separate task and buffers through memory streams, which costs time on every streamed token and
hides client disconnects from the route.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from quire.server.errors import APIError
from quire.server.request_log import REQUEST_ID_HEADER, RequestLogRecord, resolve_request_id
from quire.server.state import RETRY_AFTER_S, RequestContext, ServerState

# Always answered, even while draining, and never logged per request (probes hit them constantly).
UNTRACKED_PATHS = frozenset({"/health", "/health/live", "/health/ready", "/metrics", "/version", "/ping"})
# Bearer auth applies to these and to everything under /v1/.
AUTH_PATHS = frozenset({"/tokenize", "/detokenize"})
_REQUEST_ID_KEY = REQUEST_ID_HEADER.lower().encode()


class EdgeMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Without the --root-path prefix (uvicorn puts it in front of the path a proxy forwarded):
        # the auth and tracking rules below are about the route, whatever it is mounted under.
        path = _route_path(scope)
        headers = dict(scope["headers"])
        request_id = resolve_request_id(_header(headers, _REQUEST_ID_KEY))
        ctx = RequestContext(request_id=request_id, endpoint=path)
        scope.setdefault("state", {})["quire"] = ctx
        echoed = (_REQUEST_ID_KEY, request_id.encode())
        status_seen = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status_seen
            if message["type"] == "http.response.start":
                status_seen = message["status"]
                message["headers"] = [*message.get("headers", []), echoed]
            await send(message)

        if path in UNTRACKED_PATHS:
            await self.app(scope, receive, send_with_id)
            return
        state = self.state
        state.in_flight += 1
        started = time.monotonic()
        try:
            if path.startswith("/v1/") or path in AUTH_PATHS:
                # Before the body is read: an unauthenticated client costs nothing more.
                try:
                    ctx.auth = state.authenticate(_header(headers, b"authorization"))
                except APIError as error:
                    await _send_error(send_with_id, error)
                    return
                ctx.tenant = ctx.auth.name
            if state.draining:
                state.metrics.inc_rejected("draining")
                await _send_error(
                    send_with_id, APIError.overloaded(state.unavailable_reason() or "", RETRY_AFTER_S)
                )
                return
            try:
                body_receive = await self._read_body(scope, receive, headers)
            except TimeoutError:  # a stalled upload, or one cut short by a drain: answer and close
                state.metrics.inc_rejected("draining" if state.draining else "body_timeout")
                await _send_error(send_with_id, _body_timeout_error(state))
                return
            if body_receive is None:
                state.metrics.inc_rejected("body_too_large")
                limit = state.settings.max_body_bytes
                error = APIError.payload_too_large(
                    f"The request body is larger than the limit of {limit} bytes."
                )
                await _send_error(send_with_id, error)
                return
            await self.app(scope, body_receive, send_with_id)
        finally:
            state.in_flight -= 1
            self._log(ctx, ctx.status or status_seen or 500, started)

    async def _read_body(self, scope: Scope, receive: Receive, headers: dict[bytes, bytes]) -> Receive | None:
        """Read the whole body up to the limit and replay it; None if it is too large.

        Buffering here bounds memory per request before any JSON parsing starts, whether or not
        the client sent a Content-Length."""
        limit = self.state.settings.max_body_bytes
        declared = _header(headers, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return None
        if scope["method"] in ("GET", "HEAD"):
            return receive
        chunks: list[bytes] = []
        size = 0
        # Raises TimeoutError: a client that never finishes its body must not hold a connection
        # (and an in-flight slot that delays the drain) forever.
        async with self.state.reading_body():
            while True:
                message = await receive()
                if message["type"] != "http.request":  # disconnected while sending the body
                    return _replay(message, receive)
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    return None
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        return _replay({"type": "http.request", "body": b"".join(chunks), "more_body": False}, receive)

    def _log(self, ctx: RequestContext, status: int, started: float) -> None:
        timings: dict[str, Any] = RequestLogRecord.timings_ms(ctx.timings, now=time.monotonic())
        if timings["e2e_ms"] is None:
            timings["e2e_ms"] = round((time.monotonic() - started) * 1000.0, 3)
        record = RequestLogRecord(
            request_id=ctx.request_id,
            tenant=ctx.tenant,
            model=ctx.model,
            status=status,
            prompt_tokens=ctx.prompt_tokens,
            completion_tokens=ctx.completion_tokens,
            finish_reason=ctx.finish_reason,
            endpoint=ctx.endpoint,
            stream=ctx.stream,
            **timings,
        )
        self.state.request_logger.log(record, prompt=ctx.prompt_text, completion=ctx.completion_text)


def _body_timeout_error(state: ServerState) -> APIError:
    if state.draining:
        error = APIError.overloaded(state.unavailable_reason() or "", RETRY_AFTER_S)
    else:
        seconds = state.settings.body_timeout
        error = APIError(408, f"The request body did not arrive within {seconds:g} s.", code="timeout")
    error.headers["Connection"] = "close"  # uvicorn closes the connection after this response
    return error


def _route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root) :] or "/"
    return path


def _header(headers: dict[bytes, bytes], name: bytes) -> str | None:
    value = headers.get(name)
    return None if value is None else value.decode("latin-1")


def _replay(first: Message, receive: Receive) -> Receive:
    pending: list[Message] = [first]

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()  # after the body: waits for http.disconnect

    return replay


async def _send_error(send: Send, error: APIError) -> None:
    body = msgspec.json.encode(error.body())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
