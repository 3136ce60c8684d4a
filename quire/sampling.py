"""Sampling parameters and the public output types of a generation request.

Shaped like vLLM's so that user code moves over unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Temperatures below this are treated as greedy: dividing logits by ~0 is numerically useless.
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """How to pick tokens for one request. Validated at construction with actionable errors."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 disables top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the model's context length
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # number of top alternatives to return beside the sampled token
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        _require(self.n >= 1, f"n must be >= 1, got {self.n}")
        _require(self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}")
        _require(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        _require(self.top_k >= 0, f"top_k must be >= 1, or 0/-1 to disable, got {self.top_k}")
        _require(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        _require(
            self.repetition_penalty > 0.0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"
        )
        _require(
            -2.0 <= self.presence_penalty <= 2.0,
            f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
        )
        _require(
            -2.0 <= self.frequency_penalty <= 2.0,
            f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
        )
        _require(
            self.max_tokens is None or self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"
        )
        _require(self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}")
        _require(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
        )
        _require(
            self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
            f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}",
        )
        _require(all(s for s in self.stop), "stop strings must not be empty")
        _require(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids must be non-negative token ids")
        for token_id, bias in self.logit_bias.items():
            _require(token_id >= 0, f"logit_bias keys must be non-negative token ids, got {token_id}")
            _require(-100.0 <= bias <= 100.0, f"logit_bias values must be in [-100, 100], got {bias}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def for_child(self, index: int) -> SamplingParams:
        """Parameters for the ``index``-th of ``n`` parallel samples: n=1, and a distinct seed
        derived from the parent's so that seeded n>1 requests are reproducible yet diverse."""
        params = SamplingParams(**{**self.__dict__, "n": 1})
        if self.seed is not None:
            params.seed = (self.seed * 1_000_003 + index) % (1 << 63)
        return params


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# One entry per generated token: {token_id: Logprob} holding the sampled token and the top alternatives.
@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = most likely under the model
    decoded_token: str | None = None


SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    """One of the ``n`` sequences generated for a request."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"; None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (``time.monotonic()``) of one request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def decode_time(self) -> float | None:
        if self.first_token_time is None or self.last_token_time is None:
            return None
        return self.last_token_time - self.first_token_time


@dataclass
class RequestOutput:
    """The state of one request: its prompt, its ``n`` outputs, and timings."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = field(default=None, repr=False)
