"""Turning a ``Generation`` into a response: SSE chunks as they come, or all choices at the end.

Completions and chat differ only in how one choice is spelled, so both use these two loops with a
``ChoiceFormatter``. Choice ``index`` = prompt index * n + sequence index, as OpenAI numbers them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.requests import Request

from quire.frontend.async_client import EngineDeadError
from quire.sampling import CompletionOutput
from quire.server.openai.logprobs import Entry
from quire.server.openai.serving import (
    ClientDisconnected,
    Generation,
    RequestTimeout,
    engine_dead_error,
    timeout_error,
    until_disconnect,
)
from quire.server.sse import DONE, ChunkFramer, sse_event

# Not an HTTP status a client ever sees: the log's name (nginx's) for "the client went away".
CLIENT_CLOSED_STATUS = 499


class ChoiceFormatter(Protocol):
    def opening(self, index: int) -> dict[str, Any] | None:
        """A chunk to send for each choice before any token (chat: the role), or None."""

    def delta(self, index: int, seq: CompletionOutput) -> dict[str, Any]:
        """The choice object carrying this delta's text (and logprobs)."""

    def closing(self, index: int, seq: CompletionOutput) -> dict[str, Any]:
        """The choice object carrying the finish reason."""


async def stream_chunks(
    gen: Generation, framer: ChunkFramer, formatter: ChoiceFormatter, include_usage: bool
) -> AsyncIterator[bytes]:
    """SSE bytes for ``gen``: one event per choice delta, the usage event, then ``[DONE]``.

    Errors after the 200 went out (timeout, engine death) arrive as an OpenAI error event, which
    the official clients raise. Closing the iterator early (client gone) aborts the requests."""
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
                    parts.append(framer.choice(formatter.delta(index, seq)))
                    if texts is not None:
                        texts.setdefault(index, []).append(seq.text)
                if seq.finish_reason is not None:
                    finished.add(index)
                    parts.append(framer.choice(formatter.closing(index, seq)))
            if parts:
                yield b"".join(parts)
        gen.close()
        if include_usage:
            yield framer.usage(gen.usage())
        yield DONE
    except RequestTimeout as exc:
        ctx.status = 504
        gen.close("abort")
        yield sse_event(timeout_error(exc).body())
        yield DONE
    except EngineDeadError as exc:
        ctx.status = 503
        gen.close("error")
        yield sse_event(engine_dead_error(exc).body())
        yield DONE
    finally:
        if ctx.status is None and not all(job.done for job in gen.jobs):
            ctx.status = CLIENT_CLOSED_STATUS
        gen.close("abort")
        if texts is not None:
            ctx.completion_text = ["".join(texts.get(i, [])) for i in range(len(gen.jobs) * n)]


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
    """Run ``gen`` to the end; raise the right ``APIError`` on timeout or engine death, and
    ``ClientDisconnected`` (after aborting) if the client leaves first."""
    try:
        choices = await until_disconnect(request, _collect(gen))
    except RequestTimeout as exc:
        gen.close("abort")
        raise timeout_error(exc) from None
    except EngineDeadError as exc:
        gen.close("error")
        raise engine_dead_error(exc) from None
    except ClientDisconnected:
        gen.ctx.status = CLIENT_CLOSED_STATUS
        raise
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
