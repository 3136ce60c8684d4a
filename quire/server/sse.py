"""Server-sent events as OpenAI streams them, and a response that notices client disconnects.

``SSEResponse`` sends pre-encoded ``data: ...\\n\\n`` chunks from an async iterator while watching
the connection; when the client goes away it cancels the iterator at once (not at the next token,
and not only after a queued request starts), so the iterator's ``finally`` aborts the request in
the engine and its KV blocks go back to the pool.

``ChunkFramer`` encodes the constant part of every chunk (id, object, created, model) once per
request, so a streamed token costs one small msgspec encode of its choice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import msgspec
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"
_encode = msgspec.json.encode


def sse_event(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + _encode(payload) + b"\n\n"


class ChunkFramer:
    """Builds ``data: {"id":..,"object":..,"created":..,"model":..,"choices":[...]}`` events.

    With ``include_usage`` every chunk carries ``"usage": null`` and the last one the usage, as
    OpenAI sends them with ``stream_options.include_usage``.
    """

    def __init__(self, head: Mapping[str, Any], include_usage: bool) -> None:
        self._prefix = b"data: " + _encode(head)[:-1] + b',"choices":['
        self._suffix = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"

    def choice(self, choice: Mapping[str, Any]) -> bytes:
        return self._prefix + _encode(choice) + self._suffix

    def usage(self, usage: Mapping[str, Any]) -> bytes:
        return self._prefix + b'],"usage":' + _encode(usage) + b"}\n\n"


class SSEResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], headers: Mapping[str, str] | None = None) -> None:
        self.body_iterator = content
        self.status_code = 200
        self.background = None
        # no-cache and no proxy buffering: each event must reach the client as it is produced.
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        watch = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            await asyncio.wait((pump, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, watch):
                task.cancel()
            for task in (pump, watch):
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await task
            # The iterator's finally (abort, bookkeeping) runs now, whichever side stopped first.
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.body_iterator:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
