"""Shared by the completion and chat routes: admit a request at the edge, run it, account for it.

``submit`` applies the policy in a fixed order, each step cheaper than the next and nothing
reaching the engine until all pass: engine available (503) -> prompts valid and fitting the
context (400) -> queue not full (503, backpressure) -> tenant's rate limit (429). A ``Generation``
is then the HTTP request's engine requests (one per prompt); closing it aborts whatever is still
running, records metrics, refunds the unused rate-limit estimate and fills the log context.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from starlette.requests import Request

from quire.frontend.async_client import EngineDeadError, RequestStream
from quire.frontend.input_processor import InputProcessor, ProcessedPrompt, PromptType
from quire.frontend.output_processor import OutputKind
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

    def set_timeout(self, seconds: float | None) -> None:
        """End every unfinished stream with ``RequestTimeout`` after ``seconds``. A timer, not a
        cancellation: the consumer gets the error at its next read, with all tokens before it."""
        if seconds is not None:
            self._deadline = asyncio.get_running_loop().call_later(seconds, self._expire, seconds)

    def _expire(self, seconds: float) -> None:
        self.timed_out = True
        for job in self.jobs:
            if not job.done:
                job.stream.fail(RequestTimeout(seconds))

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
        for seq in output.outputs:
            count += len(seq.token_ids)
            if seq.finish_reason is not None:
                job.finish_reasons[seq.index] = seq.finish_reason
        job.generated += count
        if self._gaps and count:
            now = time.monotonic()
            if job.last_token_at is not None:
                self.state.metrics.observe_token_gap(now - job.last_token_at, count)
            elif count > 1:  # the first token has no gap; the ones merged with it share this delta
                self.state.metrics.observe_token_gap(0.0, count - 1)
            job.last_token_at = now
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


def submit(
    state: ServerState,
    ctx: RequestContext,
    tenant: Tenant,
    prompts: Sequence[PromptType],
    params: SamplingParams,
    priority: int,
    streaming: bool,
) -> Generation:
    """Validate, apply backpressure and rate limits, and start the engine requests."""
    client = state.engine()
    processor = client.input_processor
    assert processor is not None
    requests = [
        _make_request(state, processor, client.new_request_id(), p, params, priority) for p in prompts
    ]
    ctx.prompt_tokens = sum(len(processed.token_ids) for processed, _ in requests)

    new_seqs = params.n * len(requests)
    admissible = state.max_num_seqs + state.settings.max_waiting
    if new_seqs > admissible:  # would be refused even by an idle server: a 400, not a retryable 503
        state.metrics.inc_rejected("invalid")
        raise APIError.invalid_request(
            f"This request asks for {new_seqs} sequences (n x prompts), more than the {admissible} this server "
            "admits at once (max_num_seqs + max_waiting); lower n or send fewer prompts per request.",
            param="n",
        )
    queued = client.num_unfinished_seqs + new_seqs - state.max_num_seqs
    if queued > state.settings.max_waiting:
        state.metrics.inc_rejected("backpressure")
        raise APIError.overloaded(
            f"The server is at capacity ({client.num_unfinished_seqs} sequences admitted, at most "
            f"{state.max_num_seqs} running and {state.settings.max_waiting} queued); retry shortly.",
            retry_after_s=RETRY_AFTER_S,
        )

    max_model_len = client.info.max_model_len if client.info else 0
    estimate = sum(
        len(processed.token_ids) + params.n * (params.max_tokens or max_model_len - len(processed.token_ids))
        for processed, _ in requests
    )
    decision = state.limiter.check(tenant.name, estimate)
    if not decision.allowed:
        if decision.retryable:
            state.metrics.inc_rate_limited()
        else:
            state.metrics.inc_rejected("too_long")
        raise decision.to_api_error()

    jobs: list[Job] = []
    try:
        for index, (processed, request) in enumerate(requests):
            # A non-streaming response needs only the finished text: no per-step deltas.
            kind = OutputKind.DELTA if streaming else OutputKind.FINAL_ONLY
            stream = client.add_request(processed, request, kind)
            jobs.append(Job(index, request.request_id, processed, stream, request.arrival_time))
    except BaseException:
        for job in jobs:
            client.abort_now(job.engine_id)
        state.limiter.refund(tenant.name, estimate)
        raise
    generation = Generation(state, ctx, tenant, params, jobs, estimate, streaming)
    generation.set_timeout(state.settings.request_timeout)
    return generation


def _make_request(
    state: ServerState,
    processor: InputProcessor,
    engine_id: str,
    prompt: PromptType,
    params: SamplingParams,
    priority: int,
):
    try:
        return processor.make_request(engine_id, prompt, params, priority)
    except ValueError as exc:
        state.metrics.inc_rejected("too_long" if _too_long(processor, prompt, params) else "invalid")
        raise APIError.invalid_request(str(exc)) from None


def _too_long(processor: InputProcessor, prompt: PromptType, params: SamplingParams) -> bool:
    try:
        num_tokens = len(processor.process_prompt(prompt).token_ids)
    except ValueError:
        return False
    return num_tokens + (params.max_tokens or 1) > processor.max_model_len


class RequestTimeout(Exception):
    """The request ran past ``--request-timeout``."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"The request did not finish within the server's request timeout of {seconds:g} s.")
        self.seconds = seconds


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
