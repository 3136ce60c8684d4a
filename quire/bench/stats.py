"""Per-request timing records and their per-level aggregates (throughput, latency percentiles,
goodput). Pure Python: no I/O, so the arithmetic is testable on synthetic records."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any


def percentile(values: Sequence[float], p: float) -> float | None:
    """The ``p``-th percentile with linear interpolation between closest ranks (numpy's default);
    None for no values, so an empty level saves as JSON null rather than NaN."""
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    if not values:
        return None
    xs = sorted(values)
    rank = (len(xs) - 1) * p / 100
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


@dataclass(frozen=True)
class RequestRecord:
    """One request as the client saw it. Times are seconds; ``chunk_times`` are offsets from the
    send time of each streamed chunk that carried output."""

    ok: bool
    e2e_s: float = 0.0
    ttft_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    chunk_times: tuple[float, ...] = ()
    error: str | None = None

    def __post_init__(self) -> None:
        if self.ok and self.error is not None:
            raise ValueError("a successful request record cannot carry an error")
        if not self.ok and self.error is None:
            raise ValueError("a failed request record needs an error message")
        if self.output_tokens < 0 or self.e2e_s < 0:
            raise ValueError("output_tokens and e2e_s must be >= 0")

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (tokens - 1)."""
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def itl_s(self) -> list[float]:
        """Inter-token latencies: gaps between consecutive chunks, each divided by the mean tokens
        per chunk (a server may pack several tokens into one chunk; the stream does not say how many
        each holds, the usage total does)."""
        if len(self.chunk_times) < 2:
            return []
        tokens_per_chunk = max(1.0, self.output_tokens / len(self.chunk_times))
        return [(b - a) / tokens_per_chunk for a, b in pairwise(self.chunk_times)]


@dataclass(frozen=True)
class SLO:
    """Latency targets for goodput; an unset target is not checked."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"SLO {name} must be > 0, got {value}")

    @property
    def is_set(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None

    def met(self, record: RequestRecord) -> bool:
        if not record.ok:
            return False
        if self.ttft_ms is not None and (record.ttft_s is None or record.ttft_s * 1000 > self.ttft_ms):
            return False
        # A one-token request has no TPOT; it cannot miss a TPOT target.
        tpot = record.tpot_s
        return self.tpot_ms is None or tpot is None or tpot * 1000 <= self.tpot_ms


@dataclass(frozen=True)
class Percentiles:
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None

    @classmethod
    def of(cls, values: Sequence[float], scale: float = 1.0) -> Percentiles:
        if not values:
            return cls()
        scaled = [v * scale for v in values]
        return cls(
            mean=sum(scaled) / len(scaled),
            p50=percentile(scaled, 50),
            p90=percentile(scaled, 90),
            p99=percentile(scaled, 99),
        )


@dataclass(frozen=True)
class LevelResult:
    """Aggregates of one load level: a concurrency limit, a request rate, or both."""

    concurrency: int | None
    request_rate: float | None
    requests: int
    ok: int
    failed: int
    wall_s: float
    output_tokens: int
    input_tokens: int
    output_tok_s: float
    total_tok_s: float
    req_s: float
    goodput_req_s: float | None = None
    first_error: str | None = None
    ttft_ms: Percentiles = field(default_factory=Percentiles)
    tpot_ms: Percentiles = field(default_factory=Percentiles)
    itl_ms: Percentiles = field(default_factory=Percentiles)
    e2e_ms: Percentiles = field(default_factory=Percentiles)

    def __post_init__(self) -> None:
        if self.ok + self.failed != self.requests:
            raise ValueError(f"ok ({self.ok}) + failed ({self.failed}) != requests ({self.requests})")
        if self.wall_s < 0:
            raise ValueError(f"wall_s must be >= 0, got {self.wall_s}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LevelResult:
        kwargs = dict(data)
        for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            kwargs[name] = Percentiles(**(kwargs.get(name) or {}))
        return cls(**kwargs)


def aggregate(
    records: Iterable[RequestRecord],
    wall_s: float,
    *,
    concurrency: int | None,
    request_rate: float | None = None,
    slo: SLO | None = None,
) -> LevelResult:
    """Fold one level's request records into its :class:`LevelResult`."""
    records = list(records)
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    # Guard the division only; a zero wall time means nothing ran, and rates of 0 say so.
    per_s = (1.0 / wall_s) if wall_s > 0 else 0.0
    goodput = None
    if slo is not None and slo.is_set:
        goodput = sum(1 for r in ok if slo.met(r)) * per_s
    return LevelResult(
        concurrency=concurrency,
        request_rate=request_rate,
        requests=len(records),
        ok=len(ok),
        failed=len(failed),
        wall_s=wall_s,
        output_tokens=out_tokens,
        input_tokens=in_tokens,
        output_tok_s=out_tokens * per_s,
        total_tok_s=(out_tokens + in_tokens) * per_s,
        req_s=len(ok) * per_s,
        goodput_req_s=goodput,
        first_error=failed[0].error if failed else None,
        ttft_ms=Percentiles.of([r.ttft_s for r in ok if r.ttft_s is not None], 1000),
        tpot_ms=Percentiles.of([t for r in ok if (t := r.tpot_s) is not None], 1000),
        itl_ms=Percentiles.of([x for r in ok for x in r.itl_s], 1000),
        e2e_ms=Percentiles.of([r.e2e_s for r in ok], 1000),
    )
