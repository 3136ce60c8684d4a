"""Shared by the completion and chat routes: run an admitted request and account for it.

A ``Generation`` (made by ``admission.submit``) is the HTTP request's engine requests (one per
prompt); closing it aborts whatever is still running, records metrics, refunds the unused
rate-limit estimate and fills the log context. Live generations are registered with the
``ServerState`` so a shutdown can end each with an error its client sees. The errors a running
request can end with, and their API answers, are here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from starlette.requests import Request

from quire.frontend.async_client import EngineDeadError, RequestStream
from quire.frontend.input_processor import ProcessedPrompt
from quire.sampling import RequestMetrics, RequestOutput, SamplingParams
from quire.server.auth import Tenant
from quire.server.errors import APIError
from quire.server.state import RETRY_AFTER_S, RequestContext, ServerState

T = TypeVar("T")


@dataclass
class Job:
    """One engine request: one prompt of the HTTP request, with its ``n`` sequences."""

    prompt_index: int
    engine_id: str
    processed: ProcessedPrompt
    stream: RequestStream
    arrival_time: float
    metrics: RequestMetrics | None = None
    generated: int = 0
    cached_tokens: int = 0
    finish_reasons: dict[int, str] = field(default_factory=dict)
    done: bool = False
    last_token_at: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.processed.token_ids)


class Generation:
    """The running engine requests of one HTTP request. Use as ``async with``/``close()``."""

    def __init__(
        self,
        state: ServerState,
        ctx: RequestContext,
        tenant: Tenant,
        params: SamplingParams,
        jobs: list[Job],
        estimate: int,
        streaming: bool,
    ) -> None:
        self.state = state
        self.ctx = ctx
        self.tenant = tenant
        self.params = params
        self.jobs = jobs
        self.estimate = estimate
        # Real token gaps go to the ITL histogram when each delta is one sequence's tokens.
        self._gaps = streaming and params.n == 1
        self._closed = False
        self._deadline: asyncio.TimerHandle | None = None
        self.timed_out = False
        state.live_generations.add(self)

    def fail(self, error: BaseException) -> None:
        """End every unfinished stream with ``error`` at its consumer's next read (tokens before
        it are still delivered); the consumer then answers with the error and closes."""
        for job in self.jobs:
            if not job.done:
                job.stream.fail(error)

    def set_timeout(self, seconds: float | None) -> None:
        """End every unfinished stream with ``RequestTimeout`` after ``seconds``. A timer, not a
        cancellation: the consumer gets the error at its next read, with all tokens before it."""
        if seconds is not None:
            self._deadline = asyncio.get_running_loop().call_later(seconds, self._expire, seconds)

    def _expire(self, seconds: float) -> None:
        self.timed_out = True
        self.fail(RequestTimeout(seconds))

    @property
    def prompt_tokens(self) -> int:
        return sum(job.num_prompt_tokens for job in self.jobs)

    @property
    def completion_tokens(self) -> int:
        return sum(job.generated for job in self.jobs)

    @property
    def cached_tokens(self) -> int:
        return sum(job.cached_tokens for job in self.jobs)

    def usage(self) -> dict[str, object]:
        prompt, completion = self.prompt_tokens, self.completion_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }

    async def outputs(self) -> AsyncIterator[tuple[Job, RequestOutput]]:
        """Every delta of every job as it arrives (one job: straight from its stream)."""
        if len(self.jobs) == 1:
            job = self.jobs[0]
            async for output in job.stream:
                self._account(job, output)
                yield job, output
            return
        queue: asyncio.Queue[tuple[Job, RequestOutput | BaseException]] = asyncio.Queue()

        async def forward(job: Job) -> None:
            try:
                async for output in job.stream:
                    queue.put_nowait((job, output))
            except Exception as exc:
                queue.put_nowait((job, exc))

        tasks = [asyncio.ensure_future(forward(job)) for job in self.jobs]
        try:
            remaining = len(self.jobs)
            while remaining:
                job, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                self._account(job, item)
                if item.finished:
                    remaining -= 1
                yield job, item
        finally:
            for task in tasks:
                task.cancel()

    def _account(self, job: Job, output: RequestOutput) -> None:
        job.metrics = output.metrics
        job.cached_tokens = output.num_cached_tokens
        count = 0
        failed = False
        for seq in output.outputs:
            count += len(seq.token_ids)
            if seq.finish_reason is not None:
                job.finish_reasons[seq.index] = seq.finish_reason
                failed = failed or seq.finish_reason == "error"
        job.generated += count
        if self._gaps and count:
            now = time.monotonic()
            if job.last_token_at is not None:
                self.state.metrics.observe_token_gap(now - job.last_token_at, count)
            elif count > 1:  # the first token has no gap; the ones merged with it share this delta
                self.state.metrics.observe_token_gap(0.0, count - 1)
            job.last_token_at = now
        if failed:
            # The engine failed this request (and only it): nothing more will come for its other
            # sequences that the client could use, so the whole HTTP request fails, and siblings
            # still running are aborted (idempotent) rather than left to run to their limit.
            if not job.done:
                self.state.client.abort_now(job.engine_id)
                job.done = True
                self._observe_finished(job, "error")
            raise EngineRequestError()
        if output.finished:
            job.done = True
            self._observe_finished(job, job.finish_reasons.get(0, "stop"))

    def _observe_finished(self, job: Job, reason: str) -> None:
        metrics = job.metrics or RequestMetrics(job.arrival_time)
        if metrics.finished_time is None:
            metrics.finished_time = time.monotonic()
        self.state.metrics.observe_request_finished(
            reason, metrics, job.generated, num_prompt_tokens=job.num_prompt_tokens, record_itl=not self._gaps
        )

    def close(self, reason: str = "abort") -> None:
        """Abort unfinished jobs (recording ``reason``), refund unused tokens, fill the log context."""
        if self._closed:
            return
        self._closed = True
        if self._deadline is not None:
            self._deadline.cancel()
        self.state.live_generations.discard(self)
        client = self.state.client
        for job in self.jobs:
            if not job.done:
                client.abort_now(job.engine_id)
                job.done = True
                self._observe_finished(job, reason)
        used = self.prompt_tokens + self.completion_tokens
        if self.estimate > used:
            self.state.limiter.refund(self.tenant.name, self.estimate - used)
        ctx = self.ctx
        ctx.prompt_tokens, ctx.completion_tokens = self.prompt_tokens, self.completion_tokens
        reasons = {r for job in self.jobs for r in job.finish_reasons.values()}
        ctx.finish_reason = ",".join(sorted(reasons)) if reasons else reason
        ctx.timings = self.jobs[0].metrics or RequestMetrics(self.jobs[0].arrival_time)


class RequestTimeout(Exception):
    """The request ran past ``--request-timeout``."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"The request did not finish within the server's request timeout of {seconds:g} s.")
        self.seconds = seconds


class ServerShutdown(Exception):
    """The server's drain ran past ``--shutdown-timeout`` with this request still running."""

    def __init__(self) -> None:
        super().__init__("The server is shutting down and could not finish this request in time; retry it.")


class EngineRequestError(Exception):
    """The engine failed this request (finish reason ``error``); other requests are unaffected."""


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, but cancel it and raise ``ClientDisconnected`` if the client disconnects."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def engine_dead_error(exc: EngineDeadError) -> APIError:
    return APIError.overloaded(f"The engine stopped: {exc}", retry_after_s=RETRY_AFTER_S)


def timeout_error(exc: RequestTimeout) -> APIError:
    return APIError(504, str(exc), code="timeout")


def shutdown_error(exc: ServerShutdown) -> APIError:
    return APIError.overloaded(str(exc), retry_after_s=RETRY_AFTER_S, code="server_shutdown")


def engine_request_error() -> APIError:
    # Generic on purpose: what failed inside the engine is for the server's log, not the client.
    return APIError(500, "The engine failed while running this request; retry it.", code="engine_error")
