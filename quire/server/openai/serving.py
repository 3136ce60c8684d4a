"""Shared by the completion and chat routes: admit a request at the edge, run it, account for it.

``submit`` applies the policy in a fixed order, cheapest first, nothing reaching the engine until
all pass and no tokenizing before the tenant's rate limit: engine available (503) -> sequence
count (400) -> prompt bytes (413) -> queue not full (503, backpressure) -> rate limit on an
estimate (429) -> tokenize (off the event loop when long) and validate (400) -> rate limit settled
on the real counts -> backpressure again. A ``Generation`` is then the HTTP request's engine
requests (one per prompt); closing it aborts whatever is still running, records metrics, refunds
the unused rate-limit estimate and fills the log context. Live generations are registered with
the ``ServerState`` so a shutdown can end each with an error its client sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn, TypeVar

from starlette.requests import Request

from quire.core.request import EngineCoreRequest
from quire.frontend.async_client import EngineClient, EngineDeadError, RequestStream
from quire.frontend.input_processor import InputProcessor, ProcessedPrompt, PromptType
from quire.frontend.output_processor import OutputKind
from quire.sampling import RequestMetrics, RequestOutput, SamplingParams
from quire.server.auth import Tenant
from quire.server.errors import APIError, retry_after_header
from quire.server.ratelimit import Decision
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
        if "error" in job.finish_reasons.values():
            # The engine failed this request (and only it): nothing more will come for its other
            # sequences that the client could use, so the whole HTTP request fails.
            if not job.done:
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


async def submit(
    state: ServerState,
    ctx: RequestContext,
    tenant: Tenant,
    prompts: Sequence[PromptType],
    params: SamplingParams,
    priority: int,
    streaming: bool,
) -> Generation:
    """Apply the edge policy, tokenize and validate, and start the engine requests.

    Everything a refusal needs that costs no tokenizing comes first, so that a refused request
    (above all a rate-limited tenant's) costs the server almost nothing: engine available (503),
    sequence count (400), prompt size (413), backpressure (503), rate limit on an estimate (429).
    Then the prompts are tokenized (long ones in a worker thread, off the event loop), the rate
    limit is settled on the real token counts, and backpressure is checked again, since other
    requests may have been admitted while this one was being tokenized."""
    client = state.engine()
    processor = client.input_processor
    assert processor is not None
    tenant.priority.check(priority)  # 400 outside the tenant's grant (see auth.PriorityGrant)
    new_seqs = params.n * len(prompts)
    _check_sequence_count(state, new_seqs)
    _check_prompt_size(state, prompts)
    _check_backpressure(state, client, new_seqs)
    max_model_len = client.info.max_model_len if client.info else 0
    charged = sum(_token_estimate(_guess_tokens(p), params, max_model_len) for p in prompts)
    _charge(state, tenant, charged)
    try:
        requests = [
            await _make_request(
                state, processor, client.new_request_id(), p, params, priority, tenant.cache_salt
            )
            for p in prompts
        ]
        ctx.prompt_tokens = sum(len(processed.token_ids) for processed, _ in requests)
        estimate = sum(
            _token_estimate(len(processed.token_ids), params, max_model_len) for processed, _ in requests
        )
        _settle(state, tenant, charged, estimate)
        charged = 0  # settled: from here on the estimate is the Generation's to refund
    except BaseException:
        # Tokens back; the request itself stays counted, as its tokenizing was work done.
        if charged:
            state.limiter.refund(tenant.name, charged)
        raise
    try:
        _check_backpressure(state, client, new_seqs)
        jobs = _start_jobs(client, requests, streaming)
    except BaseException:
        state.limiter.refund(tenant.name, estimate)
        raise
    generation = Generation(state, ctx, tenant, params, jobs, estimate, streaming)
    generation.set_timeout(state.settings.request_timeout)
    return generation


def precheck(state: ServerState, tenant: Tenant, params: SamplingParams, num_prompts: int = 1) -> None:
    """The refusals ``submit`` can make without the prompt (engine, sequence count, backpressure,
    rate limit), taking nothing: for routes with costly work before ``submit`` (chat templates),
    so that a tenant already over its limit costs none of it."""
    client = state.engine()
    new_seqs = params.n * num_prompts
    _check_sequence_count(state, new_seqs)
    _check_backpressure(state, client, new_seqs)
    max_model_len = client.info.max_model_len if client.info else 0
    # The least ``submit`` will charge for any prompt: never a false "can never be admitted".
    # (Without max_tokens the estimate p + n*(len - p) is at least the context length.)
    least = 1 + params.n * params.max_tokens if params.max_tokens else max(1, max_model_len)
    decision = state.limiter.peek(tenant.name, least * num_prompts)
    if not decision.allowed:
        _rate_limit_refusal(state, decision)


def _check_sequence_count(state: ServerState, new_seqs: int) -> None:
    admissible = state.max_num_seqs + state.settings.max_waiting
    if new_seqs > admissible:  # would be refused even by an idle server: a 400, not a retryable 503
        state.metrics.inc_rejected("invalid")
        raise APIError.invalid_request(
            f"This request asks for {new_seqs} sequences (n x prompts), more than the {admissible} this server "
            "admits at once (max_num_seqs + max_waiting); lower n or send fewer prompts per request.",
            param="n",
        )


def _check_prompt_size(state: ServerState, prompts: Sequence[PromptType]) -> None:
    limit = state.settings.max_prompt_bytes
    size = sum(len(text.encode("utf-8")) for text in map(_prompt_text, prompts) if text is not None)
    if size > limit:
        state.metrics.inc_rejected("too_long")
        raise APIError(
            413,
            f"The prompt is {size} bytes of text, more than this server's limit of {limit} bytes "
            "(max_prompt_bytes, --max-prompt-bytes); shorten it.",
            param="prompt",
            code="prompt_too_large",
        )


def _check_backpressure(state: ServerState, client: EngineClient, new_seqs: int) -> None:
    queued = client.num_unfinished_seqs + new_seqs - state.max_num_seqs
    if queued > state.settings.max_waiting:
        state.metrics.inc_rejected("backpressure")
        raise APIError.overloaded(
            f"The server is at capacity ({client.num_unfinished_seqs} sequences admitted, at most "
            f"{state.max_num_seqs} running and {state.settings.max_waiting} queued); retry shortly.",
            retry_after_s=RETRY_AFTER_S,
        )


def _prompt_text(prompt: PromptType) -> str | None:
    """The text still to be tokenized, if any (a token-id prompt has none)."""
    if isinstance(prompt, str):
        return prompt
    return None


def _guess_tokens(prompt: PromptType) -> int:
    """A token count for ``prompt`` known before tokenizing: exact for token ids, else a guess."""
    text = _prompt_text(prompt)
    if text is None:
        assert isinstance(prompt, dict)
        return len(prompt.get("prompt_token_ids") or ())
    # Fewer than the ~4 characters per token of typical text: a guess above the real count could
    # refuse, as never admissible, a request that fits the tenant's burst. The rest is settled
    # once the real count is known.
    return max(1, len(text) // _CHARS_PER_TOKEN_GUESS)


_CHARS_PER_TOKEN_GUESS = 6


def _token_estimate(num_prompt_tokens: int, params: SamplingParams, max_model_len: int) -> int:
    """What a request may cost: its prompt, plus every sequence running to its token limit."""
    max_new = params.max_tokens or max(0, max_model_len - num_prompt_tokens)
    return num_prompt_tokens + params.n * max_new


def _charge(state: ServerState, tenant: Tenant, tokens: int) -> None:
    decision = state.limiter.check(tenant.name, tokens)
    if not decision.allowed:
        _rate_limit_refusal(state, decision)


def _settle(state: ServerState, tenant: Tenant, charged: int, actual: int) -> None:
    decision = state.limiter.settle(tenant.name, charged, actual)
    if not decision.allowed:
        _rate_limit_refusal(state, decision)


def _rate_limit_refusal(state: ServerState, decision: Decision) -> NoReturn:
    if decision.retryable:
        state.metrics.inc_rate_limited()
    else:
        state.metrics.inc_rejected("too_long")
    raise decision.to_api_error()


def _start_jobs(
    client: EngineClient, requests: list[tuple[ProcessedPrompt, EngineCoreRequest]], streaming: bool
) -> list[Job]:
    jobs: list[Job] = []
    # A non-streaming response needs only the finished text: no per-step deltas.
    kind = OutputKind.DELTA if streaming else OutputKind.FINAL_ONLY
    try:
        for index, (processed, request) in enumerate(requests):
            stream = client.add_request(processed, request, kind)
            jobs.append(Job(index, request.request_id, processed, stream, request.arrival_time))
    except BaseException:
        for job in jobs:
            client.abort_now(job.engine_id)
        raise
    return jobs


# Shorter texts are tokenized inline: below this a thread hop costs more than it saves.
OFFLOAD_TOKENIZE_CHARS = 16384


async def _make_request(
    state: ServerState,
    processor: InputProcessor,
    engine_id: str,
    prompt: PromptType,
    params: SamplingParams,
    priority: int,
    cache_salt: bytes,
) -> tuple[ProcessedPrompt, EngineCoreRequest]:
    text = _prompt_text(prompt)
    if text is not None and len(text) >= OFFLOAD_TOKENIZE_CHARS:
        result = await asyncio.to_thread(_prepare, processor, engine_id, prompt, params, priority, cache_salt)
    else:
        result = _prepare(processor, engine_id, prompt, params, priority, cache_salt)
    if isinstance(result, _Rejected):
        state.metrics.inc_rejected("too_long" if result.too_long else "invalid")
        raise APIError.invalid_request(result.message)
    return result


async def tokenize_text(state: ServerState, text: str, add_special_tokens: bool) -> list[int]:
    """``/tokenize``'s text path, under the same size limit and off the event loop when long."""
    _check_prompt_size(state, [text])
    tokenizer = state.engine().tokenizer
    assert tokenizer is not None
    if len(text) >= OFFLOAD_TOKENIZE_CHARS:
        return await asyncio.to_thread(tokenizer.encode, text, add_special_tokens)
    return tokenizer.encode(text, add_special_tokens)


@dataclass(frozen=True)
class _Rejected:
    message: str
    too_long: bool


def _prepare(
    processor: InputProcessor,
    engine_id: str,
    prompt: PromptType,
    params: SamplingParams,
    priority: int,
    cache_salt: bytes,
) -> tuple[ProcessedPrompt, EngineCoreRequest] | _Rejected:
    """Tokenize and validate (thread-safe: touches no server state); the prompt is tokenized once,
    and a refusal says whether the prompt did not fit the context."""
    try:
        processed = processor.process_prompt(prompt)
    except ValueError as exc:
        return _Rejected(str(exc), too_long=False)
    if isinstance(prompt, str):
        prompt = {"prompt_token_ids": processed.token_ids, "prompt": processed.prompt}
    try:
        return processor.make_request(engine_id, prompt, params, priority, cache_salt)
    except ValueError as exc:
        too_long = len(processed.token_ids) + (params.max_tokens or 1) > processor.max_model_len
        return _Rejected(str(exc), too_long=too_long)


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
    return APIError(
        503, str(exc), code="server_shutdown", headers={"Retry-After": retry_after_header(RETRY_AFTER_S)}
    )


def engine_request_error() -> APIError:
    # Generic on purpose: what failed inside the engine is for the server's log, not the client.
    return APIError(500, "The engine failed while running this request; retry it.", code="engine_error")
