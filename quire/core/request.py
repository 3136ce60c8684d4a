"""The engine core's view of one sequence being generated.

There are no prefill and decode phases: a request simply has ``num_computed_tokens`` (tokens
whose K/V are in the cache) catching up to ``num_tokens`` (prompt plus sampled tokens). A prompt
chunk, a prefix-cache hit, a decode and a recompute after preemption are all the same motion.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from quire.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    # The engine could not run this sequence (the runner rejected its input or a step failed);
    # the rest of the engine keeps serving.
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.is_finished else None


@dataclass(frozen=True)
class EngineCoreRequest:
    """What a client hands the engine core: already tokenized, already validated."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    arrival_time: float
    priority: int = 0
    cache_salt: bytes = b""  # isolates prefix-cache entries (e.g. per adapter or tenant) when set

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("the prompt must contain at least one token")


def fit_error(
    num_prompt_tokens: int, max_tokens: int | None, max_model_len: int, capacity_tokens: int
) -> str | None:
    """Why a request could never run (prompt and max_tokens vs context and KV pool), or None.

    One rule for both sides of the engine: the client rejects early with this message, and the
    scheduler rejects with it again for callers that bypass the client."""
    if num_prompt_tokens >= max_model_len:
        return (
            f"the prompt has {num_prompt_tokens} tokens, but the model's context length is {max_model_len} "
            "(the prompt must leave room for at least one generated token)"
        )
    total = num_prompt_tokens + (max_tokens if max_tokens is not None else max_model_len - num_prompt_tokens)
    if total > max_model_len:
        return (
            f"the prompt has {num_prompt_tokens} tokens and max_tokens is {max_tokens}: {total} tokens, "
            f"over the model's context length of {max_model_len}; lower max_tokens or shorten the prompt"
        )
    if total > capacity_tokens:
        return (
            f"the request needs {total} tokens of KV cache, but the whole pool holds {capacity_tokens}: "
            "lower max_tokens or give the KV cache more memory"
        )
    return None


class Request:
    """One sequence. ``n > 1`` requests become ``n`` of these sharing the prompt's KV blocks."""

    __slots__ = (
        "request_id",
        "external_id",
        "index",
        "params",
        "eos_token_ids",
        "priority",
        "arrival_time",
        "arrival_seq",
        "cache_salt",
        "num_prompt_tokens",
        "all_token_ids",
        "block_hashes",
        "num_computed_tokens",
        "num_cached_tokens",
        "max_tokens",
        "status",
        "stop_reason",
        "first_scheduled_time",
    )

    def __init__(
        self, core_request: EngineCoreRequest, index: int, arrival_seq: int, max_model_len: int
    ) -> None:
        self.external_id = core_request.request_id
        self.index = index
        # Unique inside the core; parallel samples of one request get a suffix.
        self.request_id = core_request.request_id if index == 0 else f"{core_request.request_id}#{index}"
        self.params = (
            core_request.params if core_request.params.n == 1 else core_request.params.for_child(index)
        )
        self.eos_token_ids = core_request.eos_token_ids
        self.priority = core_request.priority
        self.arrival_time = core_request.arrival_time
        self.arrival_seq = arrival_seq  # FIFO tie-break within a priority; older is smaller
        self.cache_salt = core_request.cache_salt
        self.num_prompt_tokens = len(core_request.prompt_token_ids)
        self.all_token_ids = list(core_request.prompt_token_ids)
        # Prefix-cache hashes of the leading full blocks, filled on demand by the KV manager: a
        # block's tokens never change, so each is hashed once however often it is looked up.
        self.block_hashes: list[bytes] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit length at first schedule; -1 until then
        room = max_model_len - self.num_prompt_tokens
        self.max_tokens = room if self.params.max_tokens is None else self.params.max_tokens
        self.status = RequestStatus.WAITING
        self.stop_reason: int | None = None
        self.first_scheduled_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.all_token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens :]

    @property
    def sort_key(self) -> tuple[int, int]:
        """Scheduling order: lower priority value first, then first come first served."""
        return (self.priority, self.arrival_seq)

    def append_token(self, token_id: int, max_model_len: int) -> RequestStatus:
        """Record a sampled token and decide whether the sequence is finished."""
        self.all_token_ids.append(token_id)
        generated = self.num_output_tokens
        if generated >= self.params.min_tokens:
            if token_id in self.params.stop_token_ids:
                self.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
            if not self.params.ignore_eos and token_id in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if generated >= self.max_tokens or self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return RequestStatus.RUNNING

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.value}, computed={self.num_computed_tokens}/"
            f"{self.num_tokens}, priority={self.priority})"
        )
