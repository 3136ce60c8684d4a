"""Admission at the edge, shared by the completion and chat routes: refuse early, then start.

``submit`` applies the policy in a fixed order, cheapest first, nothing reaching the engine until
all pass and no tokenizing before the tenant's rate limit: engine available (503) -> priority grant
(400) -> sequence count (400) -> prompt bytes (413) -> queue not full (503, backpressure) -> rate
limit on an estimate (429) -> tokenize (off the event loop when long) and validate (400) -> rate
limit settled on the real counts -> backpressure again. It returns the running ``Generation``.
``precheck`` makes the refusals that need no prompt, for routes with costly work before
``submit`` (chat templates).

A request that leaves ``max_tokens`` unset (``params.max_tokens`` is None) gets the server's
default (``--generation-config``'s ``max_new_tokens``) as a cap, not a demand: once the prompt is
tokenized, each prompt's limit is the default or the room its prompt leaves in the context,
whichever is less, so a default can never make a request the context could serve a 400. Without
a default, None keeps its meaning, the rest of the context. A ``max_tokens`` the request set
itself is checked as given.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Sequence
from typing import NoReturn

from quire.core.request import EngineCoreRequest
from quire.frontend.async_client import EngineClient
from quire.frontend.input_processor import InputProcessor, ProcessedPrompt, PromptType
from quire.frontend.output_processor import OutputKind
from quire.sampling import SamplingParams
from quire.server.auth import Tenant
from quire.server.errors import APIError
from quire.server.openai.serving import Generation, Job
from quire.server.ratelimit import Decision
from quire.server.state import RETRY_AFTER_S, RequestContext, ServerState
from quire.tokenizer.hf_tokenizer import GIL_FREE_ENCODE_CHARS


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
    priority grant (400), sequence count (400), prompt size (413), backpressure (503), rate limit
    on an estimate (429).
    Then the prompts are tokenized (long ones in a worker thread, off the event loop), the rate
    limit is settled on the real token counts, and backpressure is checked again, since other
    requests may have been admitted while this one was being tokenized."""
    client = state.engine()
    processor = client.input_processor
    assert processor is not None
    check_priority(state, tenant, priority)
    new_seqs = params.n * len(prompts)
    _check_sequence_count(state, new_seqs)
    _check_prompt_size(state, prompts)
    _check_backpressure(state, client, new_seqs)
    limit = _TokenLimit(params, state.settings.sampling_defaults.max_tokens, processor.max_model_len)
    charged = sum(limit.estimate(_guess_tokens(p)) for p in prompts)
    _charge(state, tenant, charged)
    try:
        requests = [
            await _make_request(
                state, processor, client.new_request_id(), p, limit, priority, tenant.cache_salt
            )
            for p in prompts
        ]
        ctx.prompt_tokens = sum(len(processed.token_ids) for processed, _ in requests)
        estimate = sum(limit.estimate(len(processed.token_ids)) for processed, _ in requests)
        settled = state.limiter.settle(tenant.name, charged, estimate)
        # Settled either way (a refusal has given the charge back): from here on the estimate is
        # the Generation's to refund, and a refund of ``charged`` below would be a second one.
        charged = 0
        if not settled.allowed:
            _rate_limit_refusal(state, settled)
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
    limit = _TokenLimit(params, state.settings.sampling_defaults.max_tokens, max_model_len)
    decision = state.limiter.peek(tenant.name, limit.least_estimate() * num_prompts)
    if not decision.allowed:
        _rate_limit_refusal(state, decision)


def check_priority(state: ServerState, tenant: Tenant, priority: int) -> None:
    """The 400 (counted as rejected) for a priority outside the tenant's grant (auth.PriorityGrant)."""
    try:
        tenant.priority.check(priority)
    except APIError:
        state.metrics.inc_rejected("invalid")
        raise


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
    size = sum(len(text.encode("utf-8")) for text in map(_prompt_text, prompts) if text is not None)
    check_prompt_bytes(state, size, "prompt")


def check_prompt_bytes(state: ServerState, size: int, param: str) -> None:
    """The 413 (counted as a ``too_long`` rejection) for ``size`` bytes of prompt text over
    ``--max-prompt-bytes``: checked before tokenizing, which costs ~2 s per MB."""
    limit = state.settings.max_prompt_bytes
    if size > limit:
        state.metrics.inc_rejected("too_long")
        raise prompt_too_large(size, limit, param)


def prompt_too_large(size: int, limit: int, param: str) -> APIError:
    return APIError(
        413,
        f"The prompt is {size} bytes of text, more than this server's limit of {limit} bytes "
        "(max_prompt_bytes, --max-prompt-bytes); shorten it.",
        param=param,
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


@dataclasses.dataclass(frozen=True)
class _TokenLimit:
    """How many tokens each sequence of a prompt may generate: the request's ``max_tokens`` as
    given; or, left unset (None), the server's ``default`` capped by the room the prompt leaves in
    the context; or, with no default either, that room."""

    params: SamplingParams
    default: int | None
    max_model_len: int

    def max_new_tokens(self, num_prompt_tokens: int) -> int:
        if self.params.max_tokens is not None:
            return self.params.max_tokens
        room = max(0, self.max_model_len - num_prompt_tokens)
        if self.default is None:
            return room
        # min_tokens is the request's own ask and outranks the server's default; if it exceeds
        # the room, the engine's context check refuses the request with both numbers.
        return max(min(self.default, room), self.params.min_tokens)

    def params_for(self, num_prompt_tokens: int) -> SamplingParams:
        """The engine's parameters for a prompt of ``num_prompt_tokens``: unchanged unless a
        default applies and the prompt leaves room (if it leaves none, the engine's own check
        says so)."""
        params = self.params
        if params.max_tokens is not None or self.default is None or num_prompt_tokens >= self.max_model_len:
            return params
        return dataclasses.replace(params, max_tokens=self.max_new_tokens(num_prompt_tokens))

    def estimate(self, num_prompt_tokens: int) -> int:
        """What a request may cost: its prompt, plus every sequence running to its token limit."""
        return num_prompt_tokens + self.params.n * self.max_new_tokens(num_prompt_tokens)

    def least_estimate(self) -> int:
        """The least ``estimate`` of any prompt (at least 1 token; it must leave room for one
        generated token), so that a check on it never refuses a request ``submit`` would admit."""
        # Without a request max_tokens, p + n * max_new_tokens(p) rises with p while a default
        # binds, then falls (n >= 1) until the room reaches 1, or min_tokens where a default
        # applies (longer prompts are refused). So its least value over the prompts admitted is at
        # one end of that range.
        floor = self.params.min_tokens if self.default is not None else 1
        longest = self.max_model_len - max(floor, 1)
        if self.params.max_tokens is not None or longest <= 1:
            return self.estimate(1)
        return min(self.estimate(1), self.estimate(longest))


def _charge(state: ServerState, tenant: Tenant, tokens: int) -> None:
    decision = state.limiter.check(tenant.name, tokens)
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


# Shorter texts are tokenized inline: below this a thread hop costs more than it saves, and only
# from this length on does ``Tokenizer.encode`` release the GIL, which makes the hop worth it.
OFFLOAD_TOKENIZE_CHARS = GIL_FREE_ENCODE_CHARS


async def _make_request(
    state: ServerState,
    processor: InputProcessor,
    engine_id: str,
    prompt: PromptType,
    limit: _TokenLimit,
    priority: int,
    cache_salt: bytes,
) -> tuple[ProcessedPrompt, EngineCoreRequest]:
    prepare = functools.partial(_prepare, processor, engine_id, prompt, limit, priority, cache_salt)
    text = _prompt_text(prompt)
    result = await asyncio.to_thread(prepare) if text and len(text) >= OFFLOAD_TOKENIZE_CHARS else prepare()
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


@dataclasses.dataclass(frozen=True)
class _Rejected:
    message: str
    too_long: bool


def _prepare(
    processor: InputProcessor,
    engine_id: str,
    prompt: PromptType,
    limit: _TokenLimit,
    priority: int,
    cache_salt: bytes,
) -> tuple[ProcessedPrompt, EngineCoreRequest] | _Rejected:
    """Tokenize and validate (thread-safe: touches no server state); the prompt is tokenized once,
    and a refusal says whether the prompt did not fit the context."""
    try:
        processed = processor.process_prompt(prompt)
        params = limit.params_for(len(processed.token_ids))
    except ValueError as exc:
        return _Rejected(str(exc), too_long=False)
    if isinstance(prompt, str):
        prompt = {"prompt_token_ids": processed.token_ids, "prompt": processed.prompt}
    try:
        return processor.make_request(engine_id, prompt, params, priority, cache_salt)
    except ValueError as exc:
        too_long = len(processed.token_ids) + (params.max_tokens or 1) > processor.max_model_len
        return _Rejected(str(exc), too_long=too_long)
