"""uvicorn's httptools protocol with a header timeout, against slow and stalled clients.

uvicorn bounds the idle time between keep-alive requests but not the time a client takes to send
a request's headers: a client that opens a connection and sends nothing, or half a request line,
holds the connection (a file descriptor and a parser) forever, and thousands of them exhaust the
server. Here each request's headers must be complete within ``header_timeout`` seconds, counted
from the connection (first request) or from the first byte of the request (later ones on a
keep-alive connection); otherwise the connection is closed without a response, since no request
was ever received to answer. The body has its own limit in the edge middleware, which can answer
with a 408 because by then the request is known.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` that closes a connection whose request headers are late.

    Use ``header_timeout_protocol(seconds)`` to get a subclass with the timeout set, and pass it
    as ``http=`` to ``uvicorn.Config``."""

    header_timeout: float = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()  # a connection that sends nothing at all is slow too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        super().on_headers_complete()

    def _arm_header_timer(self) -> None:
        # Already armed when the first request begins: its clock started at connection_made.
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._on_header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            logger.info(
                "closing a connection whose request headers did not arrive within %g s", self.header_timeout
            )
            self.transport.close()


def header_timeout_protocol(seconds: float) -> type[HeaderTimeoutProtocol]:
    """A ``HeaderTimeoutProtocol`` subclass whose connections allow ``seconds`` for headers."""
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"header timeout must be a positive number of seconds, got {seconds}")
    return type("QuireHttpProtocol", (HeaderTimeoutProtocol,), {"header_timeout": float(seconds)})
