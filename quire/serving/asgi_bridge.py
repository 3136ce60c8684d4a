"""Run an ASGI app (quire's FastAPI app) in-process for a forwarded HTTP request, and its lifespan.

A replica does not listen on a port: the ingress forwards each request as a ``ForwardedRequest``
and the replica calls the app directly, yielding the response start and then each body chunk as
the app sends it, so SSE streams arrive chunk by chunk and every validation and error path of
quire applies unchanged. After the body has been delivered, ``receive`` blocks until the caller
goes away (the generator is closed or cancelled) and only then reports ``http.disconnect``: that
is how quire notices a client that left and aborts its request in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from quire.server.errors import openai_error

logger = logging.getLogger(__name__)

Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]
Headers = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True)
class ForwardedRequest:
    """One HTTP request as the ingress received it (body read in full)."""

    method: str
    path: str
    query_string: bytes = b""
    # Not in the repr: the headers carry the Authorization key and the body the prompt, and
    # logs (Ray's included, on an error) must contain neither.
    headers: Headers = field(default=(), repr=False)
    body: bytes = field(default=b"", repr=False)
    client: tuple[str, int] | None = None
    scheme: str = "http"

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise ValueError(f"path must start with '/', got {self.path!r}")

    def scope(self) -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": self.method,
            "scheme": self.scheme,
            "path": self.path,
            "raw_path": self.path.encode(),
            "root_path": "",
            "query_string": self.query_string,
            "headers": [(k.lower(), v) for k, v in self.headers],
            "client": self.client,
            "server": None,
            "state": {},
        }


@dataclass(frozen=True)
class ResponseStart:
    """The status line and headers of a response; body chunks (``bytes``) follow it."""

    status: int
    headers: Headers = field(default=())

    def with_header(self, name: str, value: str) -> ResponseStart:
        return ResponseStart(self.status, (*self.headers, (name.lower().encode(), value.encode())))


_DONE = object()  # put on the queue when the app's task ends


async def call_app(app: ASGIApp, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
    """Yield ``ResponseStart`` then the body chunks the app sends for ``request``."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    caller_gone = asyncio.Event()
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await caller_gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await queue.put(message)

    task = asyncio.ensure_future(app(request.scope(), receive, send))
    task.add_done_callback(lambda _: queue.put_nowait(_DONE))
    started = False
    try:
        while True:
            message = await queue.get()
            if message is _DONE:
                break
            if message["type"] == "http.response.start":
                started = True
                yield ResponseStart(int(message["status"]), tuple(map(tuple, message.get("headers", ()))))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    break
        if not started:
            # The app ended without answering (it raised past its own handlers): say so.
            if not task.cancelled() and task.exception() is not None:
                logger.error("request %s %s failed: %r", request.method, request.path, task.exception())
            yield ResponseStart(500, ((b"content-type", b"application/json"),))
            yield msgspec.json.encode(openai_error(500, "The replica had an internal error; see its log."))
    finally:
        caller_gone.set()
        if not task.done():
            # Give the app a moment to see the disconnect and abort cleanly, then stop it.
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), timeout=5.0)
            task.cancel()


class Lifespan:
    """Drive an ASGI app's lifespan protocol: ``await startup()`` ... ``await shutdown()``."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._outbox: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def _send(self, message: Message) -> None:
        await self._outbox.put(message)

    async def _expect(self, kind: str) -> None:
        reply = await self._outbox.get()
        if reply["type"] != f"{kind}.complete":
            raise RuntimeError(f"the app's {kind} failed: {reply.get('message', reply['type'])}")

    async def startup(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        self._task = asyncio.ensure_future(self._app(scope, self._inbox.get, self._send))
        await self._inbox.put({"type": "lifespan.startup"})
        await self._expect("lifespan.startup")

    async def shutdown(self) -> None:
        if self._task is None or self._task.done():
            return
        await self._inbox.put({"type": "lifespan.shutdown"})
        await self._expect("lifespan.shutdown")
        await self._task
