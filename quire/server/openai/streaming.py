"""Turning a ``Generation`` into a response: SSE chunks as they come, or all choices at the end.

Completions and chat differ only in how one choice is spelled, so both use these two loops with a
``ChoiceFormatter``. Choice ``index`` = prompt index * n + sequence index, as OpenAI numbers them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.requests import Request

from quire.frontend.async_client import EngineDeadError
from quire.sampling import CompletionOutput
from quire.server.errors import APIError
from quire.server.openai.logprobs import Entry
from quire.server.openai.serving import (
    ClientDisconnected,
    EngineRequestError,
    Generation,
    RequestTimeout,
    ServerShutdown,
    engine_dead_error,
    engine_request_error,
    shutdown_error,
    timeout_error,
    until_disconnect,
)
from quire.server.sse import DONE, ChunkFramer, sse_event

logger = logging.getLogger(__name__)

# Not an HTTP status a client ever sees: the log's name (nginx's) for "the client went away".
CLIENT_CLOSED_STATUS = 499


class ChoiceFormatter(Protocol):
    def opening(self, index: int) -> dict[str, Any] | None:
        """A chunk to send for each choice before any token (chat: the role), or None."""

    def delta(self, index: int, seq: CompletionOutput) -> dict[str, Any] | list[dict[str, Any]]:
        """The choice object carrying this delta's text (and logprobs); or several, each sent
        as its own chunk, or none (an empty list) while text is held back (tool-call parsing)."""

    def closing(self, index: int, seq: CompletionOutput) -> dict[str, Any] | list[dict[str, Any]]:
        """The choice object carrying the finish reason (last, after any held-back text)."""


def _each(choices: dict[str, Any] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return choices if isinstance(choices, list) else [choices]


def stream_chunks(
    gen: Generation, framer: ChunkFramer, formatter: ChoiceFormatter, include_usage: bool
) -> AsyncIterator[bytes]:
    """SSE bytes for ``gen``: one event per choice delta, the usage event, then ``[DONE]``.

    Errors after the 200 went out (timeout, engine failure, shutdown) arrive as an OpenAI error
    event and ``[DONE]``, which the official clients raise. Closing the iterator early (client
    gone) aborts the requests, even if it was closed before its first chunk."""
    return _ClosingStream(_chunks(gen, framer, formatter, include_usage), gen)


class _ClosingStream:
    """An async generator that also closes its ``Generation`` when closed before it started
    (``aclose`` on an unstarted generator skips its ``finally``)."""

    def __init__(self, chunks: AsyncGenerator[bytes, None], gen: Generation) -> None:
        self._chunks = chunks
        self._gen = gen

    def __aiter__(self) -> _ClosingStream:
        return self

    async def __anext__(self) -> bytes:
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        try:
            await self._chunks.aclose()
        finally:
            self._gen.close("abort")


async def _chunks(
    gen: Generation, framer: ChunkFramer, formatter: ChoiceFormatter, include_usage: bool
) -> AsyncGenerator[bytes, None]:
    ctx = gen.ctx
    n = gen.params.n
    texts: dict[int, list[str]] | None = {} if gen.state.settings.log_prompts else None
    finished: set[int] = set()
    try:
        openings = [formatter.opening(i) for i in range(len(gen.jobs) * n)]
        if any(openings):
            yield b"".join(framer.choice(c) for c in openings if c)
        async for job, output in gen.outputs():
            base = job.prompt_index * n
            parts = []
            for seq in output.outputs:
                index = base + seq.index
                if index in finished:
                    continue
                if seq.token_ids or seq.text:
                    parts.extend(framer.choice(c) for c in _each(formatter.delta(index, seq)))
                    if texts is not None:
                        texts.setdefault(index, []).append(seq.text)
                if seq.finish_reason is not None:
                    finished.add(index)
                    parts.extend(framer.choice(c) for c in _each(formatter.closing(index, seq)))
            if parts:
                yield b"".join(parts)
        gen.close()
        if include_usage:
            yield framer.usage(gen.usage())
        yield DONE
    except Exception as exc:
        error, reason = stream_error(gen, exc)
        ctx.status = error.status
        gen.close(reason)
        yield sse_event(error.body())
        yield DONE
    finally:
        if ctx.status is None and not all(job.done for job in gen.jobs):
            ctx.status = CLIENT_CLOSED_STATUS
        gen.close("abort")
        if texts is not None:
            ctx.completion_text = ["".join(texts.get(i, [])) for i in range(len(gen.jobs) * n)]


def stream_error(gen: Generation, exc: Exception) -> tuple[APIError, str]:
    """The error a failed request answers with, and the finish reason its metrics record."""
    if isinstance(exc, RequestTimeout):
        return timeout_error(exc), "abort"
    if isinstance(exc, ServerShutdown):
        return shutdown_error(exc), "abort"
    if isinstance(exc, EngineDeadError):
        return engine_dead_error(exc), "error"
    if isinstance(exc, EngineRequestError):
        return engine_request_error(), "error"
    if isinstance(exc, APIError):
        return exc, "error"
    if isinstance(exc, ValueError):  # the engine refused the request's parameters
        return APIError.invalid_request(str(exc) or "invalid request"), "error"
    logger.exception("request %s failed", gen.ctx.request_id)
    return APIError(500, "The server had an internal error; see its log."), "error"


@dataclass
class Choice:
    """One finished choice of a non-streaming response."""

    index: int
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Entry] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


async def collect_choices(request: Request, gen: Generation) -> list[Choice]:
    """Run ``gen`` to the end; raise the right ``APIError`` on timeout, engine failure or
    shutdown, and ``ClientDisconnected`` (after aborting) if the client leaves first."""
    try:
        choices = await until_disconnect(request, _collect(gen))
    except ClientDisconnected:
        gen.ctx.status = CLIENT_CLOSED_STATUS
        raise
    except Exception as exc:
        error, reason = stream_error(gen, exc)
        gen.close(reason)
        raise error from None
    finally:
        gen.close("abort")
    if gen.state.settings.log_prompts:
        gen.ctx.completion_text = [c.text for c in choices]
    return choices


async def _collect(gen: Generation) -> list[Choice]:
    n = gen.params.n
    want_logprobs = gen.params.logprobs is not None
    choices = [Choice(i, logprobs=[] if want_logprobs else None) for i in range(len(gen.jobs) * n)]
    async for job, output in gen.outputs():
        base = job.prompt_index * n
        for seq in output.outputs:
            choice = choices[base + seq.index]
            if choice.finish_reason is not None:
                continue
            choice.text_parts.append(seq.text)
            choice.token_ids.extend(seq.token_ids)
            if choice.logprobs is not None and seq.logprobs:
                choice.logprobs.extend(seq.logprobs)
            if seq.finish_reason is not None:
                choice.finish_reason, choice.stop_reason = seq.finish_reason, seq.stop_reason
    return choices
