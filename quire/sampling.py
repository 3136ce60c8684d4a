"""Sampling parameters and the public output types of a generation request.

Shaped like vLLM's so that user code moves over unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real

from quire.structured.params import StructuredOutputsParams

# Temperatures below this are treated as greedy: dividing logits by ~0 is numerically useless.
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20

# Bounds that keep every parameter meaningful and every intermediate value finite in float32, the
# precision the sampler works in. A value outside them either overflows float32 (temperature 1e39
# becomes inf, top_p 1e-50 and repetition_penalty 1e-50 become 0) or changes nothing any further.
#
# Temperature: model logits span tens of units, so at 100 the distribution is already uniform
# over the candidates; larger values only bring float32 closer to overflow.
MAX_TEMPERATURE = 100.0
# top_p below this keeps only the most likely token for any vocabulary of < 10^6 tokens, exactly
# like greedy decoding; smaller values round to 0 in float32.
MIN_TOP_P = 1e-6
# Symmetric in log space around 1 (no penalty). 100 already divides any positive logit of a real
# model to ~0; the bounds keep logit * penalty and logit / penalty finite in float32.
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0
MAX_PRESENCE_FREQUENCY_PENALTY = 2.0  # OpenAI's range
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: +-100 bans or forces a token, more adds nothing
# Token ids and token counts are int32 in the runner's tensors; no vocabulary comes close.
MAX_TOKEN_ID = 2**31 - 1
MAX_TOKEN_COUNT = 2**31 - 1
# Seeds seed torch's 64-bit generators and cross the wire as msgpack integers.
MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1
# Each of the n samples is a sequence the scheduler tracks; thousands serve no purpose and only
# tie up the engine while the request is admitted.
MAX_N = 1024


@dataclass
class SamplingParams:
    """How to pick tokens for one request. Validated at construction with actionable errors.

    Bounds (a ``ValueError`` names the field otherwise): ``n`` in [1, 1024]; ``temperature`` in
    [0, 100] (below 1e-5: greedy); ``top_p`` in [1e-6, 1]; ``top_k`` -1 or 0 (off) or in
    [1, 2**31-1] (above the vocabulary: off); ``min_p`` in [0, 1]; ``repetition_penalty`` in
    [0.01, 100]; ``presence_penalty`` and ``frequency_penalty`` in [-2, 2]; ``logit_bias`` values
    in [-100, 100]; ``seed`` a 64-bit signed integer; ``max_tokens`` and ``min_tokens`` below
    2**31. NaN and infinities are refused everywhere.
    """

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
    # Constrained decoding: the output must match this JSON schema / regex / choice / grammar.
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = _normalize_logit_bias(self.logit_bias)
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        _check_int("n", self.n, 1, MAX_N)
        _check_real("temperature", self.temperature, 0.0, MAX_TEMPERATURE, hint="use 0 for greedy decoding")
        _check_real("top_p", self.top_p, MIN_TOP_P, 1.0, hint="use temperature=0 for greedy decoding")
        _check_int("top_k", self.top_k, 0, MAX_TOKEN_ID, hint="use 0 or -1 to disable top-k")
        _check_real("min_p", self.min_p, 0.0, 1.0)
        _check_real(
            "repetition_penalty",
            self.repetition_penalty,
            MIN_REPETITION_PENALTY,
            MAX_REPETITION_PENALTY,
            hint="1 means no penalty",
        )
        bound = MAX_PRESENCE_FREQUENCY_PENALTY
        _check_real("presence_penalty", self.presence_penalty, -bound, bound)
        _check_real("frequency_penalty", self.frequency_penalty, -bound, bound)
        if self.seed is not None:
            _check_int("seed", self.seed, MIN_SEED, MAX_SEED)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1, MAX_TOKEN_COUNT)
        _check_int("min_tokens", self.min_tokens, 0, MAX_TOKEN_COUNT)
        _require(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
        )
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        _require(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids entries", token_id, 0, MAX_TOKEN_ID, hint="they are token ids")
        for token_id, bias in self.logit_bias.items():
            _check_int("logit_bias keys", token_id, 0, MAX_TOKEN_ID, hint="they are token ids")
            _check_real("logit_bias values", bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
        if self.structured_outputs is not None:
            self._validate_structured()

    def _validate_structured(self) -> None:
        """Refuse what would break the promise that a constrained output parses. stop_token_ids
        are checked against the model's end-of-sequence ids by the input processor."""
        _require(
            isinstance(self.structured_outputs, StructuredOutputsParams),
            "structured_outputs must be a StructuredOutputsParams, got "
            f"{type(self.structured_outputs).__name__}",
        )
        _require(
            not self.ignore_eos,
            "ignore_eos cannot be combined with structured_outputs: a constrained output ends with "
            "end-of-sequence once its grammar is complete, and there is nothing valid to add after it",
        )
        _require(
            self.min_tokens == 0,
            "min_tokens cannot be combined with structured_outputs: it forbids end-of-sequence before "
            f"{self.min_tokens} tokens, but a complete constrained output may be shorter, and then no "
            "token would be valid",
        )
        _require(
            not self.stop,
            "stop strings cannot be combined with structured_outputs: a stop string can occur inside "
            "the constrained text (e.g. in a JSON string value) and would cut it short, leaving output "
            "that does not parse; the grammar ends the output itself",
        )

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


def _check_real(name: str, value: object, lo: float, hi: float, hint: str = "") -> None:
    """``value`` is a finite real number in [lo, hi]. Finiteness is tested first and explicitly:
    NaN fails every comparison, so a bare ``lo <= value`` test would reject it only by accident."""
    suffix = f" ({hint})" if hint else ""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a number, got {value!r}{suffix}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number in [{lo:g}, {hi:g}], got {value!r}{suffix}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo:g}, {hi:g}], got {value!r}{suffix}")


def _check_int(name: str, value: object, lo: int, hi: int, hint: str = "") -> None:
    suffix = f" ({hint})" if hint else ""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}{suffix}")
    if not lo <= value <= hi:
        shown = str(value) if len(str(value)) <= 40 else f"{str(value)[:40]}..."
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {shown}{suffix}")


def _normalize_logit_bias(logit_bias: object) -> dict[int, float]:
    """``{token id: bias}`` with int keys (JSON gives strings) and float values."""
    if logit_bias is None:
        return {}
    if not isinstance(logit_bias, dict):
        raise ValueError(f"logit_bias must be a mapping of token id to bias, got {type(logit_bias).__name__}")
    result: dict[int, float] = {}
    for key, value in logit_bias.items():
        try:
            token_id = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias keys must be token ids (integers), got {str(key)[:40]!r}") from None
        if isinstance(value, bool) or not isinstance(value, Real):
            raise ValueError(f"logit_bias values must be numbers, got {value!r}")
        result[token_id] = float(value)
    return result


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
    # "stop" | "length" | "abort" | "error" (the engine failed this sequence); None while running
    finish_reason: str | None = None
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
