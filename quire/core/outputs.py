"""The data that crosses the scheduler -> runner -> engine boundaries. Plain, torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field

from quire.sampling import SamplingParams


@dataclass(frozen=True)
class NewRequestData:
    """A request the runner has not seen (or must rebuild after preemption)."""

    request_id: str
    token_ids: list[int]  # prompt plus any tokens generated before a preemption
    num_prompt_tokens: int
    params: SamplingParams
    eos_token_ids: frozenset[int]
    block_ids: list[int]
    num_computed_tokens: int


@dataclass(frozen=True)
class CachedRequestData:
    """A request the runner already tracks: only what changed."""

    request_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass(frozen=True)
class SchedulerOutput:
    """One step's plan. ``num_scheduled_tokens`` lists requests in batch order."""

    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # Requests the runner must forget: finished, aborted or preempted since the last step.
    finished_request_ids: frozenset[str]

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class TokenLogprobs:
    """The sampled token's logprob and rank under the raw model distribution, plus alternatives."""

    token_id: int
    logprob: float
    rank: int  # 1 = most likely; ties share the better rank
    top_token_ids: list[int]  # the params.logprobs most likely tokens, most likely first
    top_logprobs: list[float]


class RequestExecutionError(RuntimeError):
    """The runner refused to run a step because of what some requests carry (e.g. a token id
    outside the model's vocabulary). Raised before the model runs and after the runner has
    applied the plan, so every other request of the step can simply be scheduled again."""

    def __init__(self, message: str, request_ids: frozenset[str] | set[str]) -> None:
        super().__init__(message)
        self.request_ids = frozenset(request_ids)


@dataclass(frozen=True)
class RunnerOutput:
    """What the model runner sampled: one entry per request that reached the end of its tokens."""

    request_ids: list[str]
    sampled_token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # per entry; None where no logprobs were asked for


@dataclass
class EngineCoreOutput:
    """New tokens for one sequence of a request, and whether it finished."""

    request_id: str  # the client's id
    index: int  # which of the n parallel samples
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | None = None
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None  # set on a sequence's first output only


@dataclass(frozen=True)
class StepStats:
    """A snapshot after one engine step; the server turns these into Prometheus metrics."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_scheduled_tokens: int
    num_prompt_tokens: int  # prompt tokens computed this step (cache hits excluded)
    num_generation_tokens: int
    num_preemptions: int
    prefix_cache_queries: int  # cumulative, tokens
    prefix_cache_hits: int  # cumulative, tokens
