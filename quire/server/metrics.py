"""Prometheus metrics for the server, in a registry owned by one ``ServerMetrics``.

Each app builds its own ``ServerMetrics`` (and so its own ``CollectorRegistry``): two servers in
one process, e.g. in tests, never share or double-register series. Every series carries a
``model_name`` label so one Prometheus can scrape several servers.

Feeding it:

* ``observe_step(stats)`` once per engine step with the engine's ``StepStats``: gauges are set,
  per-step token counts are added, and the *cumulative* prefix-cache totals are turned into
  counter increments by their delta since the previous call (a drop means the engine restarted,
  and the new total is counted as the delta, as Prometheus treats counter resets).
* ``observe_request_finished(finish_reason, metrics, num_generation_tokens)`` once per request
  with its ``RequestMetrics`` timestamps: queue, prefill, TTFT, decode and end-to-end latency.
  ``stop``/``length`` count in ``quire:request_success_total``, ``abort`` in
  ``quire:request_aborted_total``, ``error`` in ``quire:request_error_total`` (as vLLM, whose
  success counter never counts failures).
* Inter-token latency, either way but not both for one request:
  - streaming routes call ``observe_token_gap(seconds, count)`` per delivered chunk and pass
    ``record_itl=False`` when the request finishes; this records the real gaps;
  - otherwise ``observe_request_finished`` (default ``record_itl=True``) records the request's
    mean gap ``decode_time / (tokens - 1)`` once per gap, so the histogram's sum and count equal
    the per-token ones and only the spread within a request is lost.
* ``inc_rate_limited()`` per 429 from the rate limiter; ``inc_rejected(reason)`` for any other
  request refused before it reached the engine.

Label values (finish reasons, rejection reasons) must be short snake_case words written in code,
never user input, so the number of series stays bounded; the usual ones exist at 0 from the start
so dashboards and ``rate()`` see them before the first event.
"""

from __future__ import annotations

import re
import threading
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# 1 ms (a fast GPU step) up to 10 minutes (a long CPU generation): latency spans five decades.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 1.5, 2.0, 2.5, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
# Inter-token gaps: ~1 ms per token on a GPU decode, up to seconds on a loaded CPU.
ITL_BUCKETS: tuple[float, ...] = (
    0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0,
)  # fmt: skip
TOKEN_COUNT_BUCKETS: tuple[float, ...] = tuple(
    float(m * 10**e) for e in range(0, 6) for m in (1, 2, 5)
)  # 1 .. 500k tokens

FINISH_REASONS: tuple[str, ...] = ("stop", "length", "abort", "error")
# As vLLM: only these finish a request successfully; aborts and errors have counters of their own.
SUCCESS_REASONS: tuple[str, ...] = ("stop", "length")
REJECT_REASONS: tuple[str, ...] = (
    "backpressure",
    "too_long",
    "invalid",
    "unauthorized",
    "not_found",
    "body_too_large",
    "body_timeout",
    "draining",
)

_LABEL_VALUE_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")


class StepStatsLike(Protocol):
    """What ``observe_step`` reads; ``quire.core.outputs.StepStats`` satisfies it."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_prompt_tokens: int
    num_generation_tokens: int
    prefix_cache_queries: int
    prefix_cache_hits: int


class RequestTimings(Protocol):
    """Monotonic timestamps of one request; ``quire.sampling.RequestMetrics`` satisfies it."""

    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    last_token_time: float | None
    finished_time: float | None


def _label(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _LABEL_VALUE_RE.fullmatch(value):
        raise ValueError(
            f"{kind} must be a short snake_case word like {FINISH_REASONS[0]!r} (it becomes a metric "
            f"label, so never pass user input), got {value!r}"
        )
    return value


def _span(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    # Timestamps come from CLOCK_MONOTONIC in two processes; clamp tiny negative skews to 0.
    return max(0.0, end - start)


class ServerMetrics:
    """All server metrics, named ``quire:*``, in this object's own registry."""

    def __init__(self, model_name: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self._lock = threading.Lock()
        self._last_prefix_queries = 0
        self._last_prefix_hits = 0
        labels = ["model_name"]
        reg = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=reg)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, [*labels, *extra], registry=reg)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=reg)

        m = model_name
        self.num_requests_running = gauge(
            "quire:num_requests_running", "Requests in the running batch."
        ).labels(m)
        self.num_requests_waiting = gauge(
            "quire:num_requests_waiting", "Requests waiting to be scheduled."
        ).labels(m)
        self.kv_cache_usage = gauge(
            "quire:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full)."
        ).labels(m)
        self.prefix_cache_queries = counter(
            "quire:prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        ).labels(m)
        self.prefix_cache_hits = counter(
            "quire:prefix_cache_hits", "Prompt tokens found in the prefix cache."
        ).labels(m)
        self.prompt_tokens = counter(
            "quire:prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded)."
        ).labels(m)
        self.generation_tokens = counter("quire:generation_tokens", "Tokens generated.").labels(m)
        self.num_preemptions = counter(
            "quire:num_preemptions", "Requests preempted to free KV cache."
        ).labels(m)
        self._request_success = counter(
            "quire:request_success",
            "Requests that finished normally, by finish reason (stop or length).",
            ("finished_reason",),
        )
        self.requests_aborted = counter(
            "quire:request_aborted",
            "Requests ended before finishing: client gone, timeout or shutdown.",
        ).labels(m)
        self.requests_failed = counter(
            "quire:request_error", "Requests that failed in the engine or the server after admission."
        ).labels(m)
        self.requests_rate_limited = counter(
            "quire:requests_rate_limited", "Requests refused by the per-tenant rate limiter (429)."
        ).labels(m)
        self._requests_rejected = counter(
            "quire:requests_rejected", "Requests refused before reaching the engine, by reason.", ("reason",)
        )
        self.engine_restarts = counter(
            "quire:engine_restarts", "Engine-core processes started to replace one that died."
        ).labels(m)
        self.time_to_first_token = histogram(
            "quire:time_to_first_token_seconds", "Arrival to first generated token.", LATENCY_BUCKETS
        ).labels(m)
        self.inter_token_latency = histogram(
            "quire:inter_token_latency_seconds", "Time between consecutive generated tokens.", ITL_BUCKETS
        ).labels(m)
        self.e2e_request_latency = histogram(
            "quire:e2e_request_latency_seconds", "Arrival to finish.", LATENCY_BUCKETS
        ).labels(m)
        self.request_queue_time = histogram(
            "quire:request_queue_time_seconds", "Arrival to first scheduled.", LATENCY_BUCKETS
        ).labels(m)
        self.request_prefill_time = histogram(
            "quire:request_prefill_time_seconds", "First scheduled to first token.", LATENCY_BUCKETS
        ).labels(m)
        self.request_decode_time = histogram(
            "quire:request_decode_time_seconds", "First token to last token.", LATENCY_BUCKETS
        ).labels(m)
        self.request_generation_tokens = histogram(
            "quire:request_generation_tokens", "Tokens generated per finished request.", TOKEN_COUNT_BUCKETS
        ).labels(m)
        self.request_prompt_tokens = histogram(
            "quire:request_prompt_tokens", "Prompt tokens per finished request.", TOKEN_COUNT_BUCKETS
        ).labels(m)
        for reason in SUCCESS_REASONS:
            self._request_success.labels(m, reason)
        for reason in REJECT_REASONS:
            self._requests_rejected.labels(m, reason)

    def observe_step(self, stats: StepStatsLike) -> None:
        """Record one engine step's ``StepStats``."""
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        if stats.num_prompt_tokens > 0:
            self.prompt_tokens.inc(stats.num_prompt_tokens)
        if stats.num_generation_tokens > 0:
            self.generation_tokens.inc(stats.num_generation_tokens)
        preemptions = getattr(stats, "num_preemptions", 0)
        if preemptions > 0:
            self.num_preemptions.inc(preemptions)
        with self._lock:
            queries = self._delta(stats.prefix_cache_queries, self._last_prefix_queries)
            hits = self._delta(stats.prefix_cache_hits, self._last_prefix_hits)
            self._last_prefix_queries = stats.prefix_cache_queries
            self._last_prefix_hits = stats.prefix_cache_hits
        if queries:
            self.prefix_cache_queries.inc(queries)
        if hits:
            self.prefix_cache_hits.inc(hits)

    @staticmethod
    def _delta(total: int, last: int) -> int:
        return total - last if total >= last else total

    def observe_request_finished(
        self,
        finish_reason: str,
        metrics: RequestTimings,
        num_generation_tokens: int,
        *,
        num_prompt_tokens: int | None = None,
        record_itl: bool = True,
    ) -> None:
        """Record a finished request. Pass ``record_itl=False`` if its gaps went to ``observe_token_gap``."""
        reason = _label("finish_reason", finish_reason)
        if num_generation_tokens < 0:
            raise ValueError(f"num_generation_tokens must be >= 0, got {num_generation_tokens}")
        if reason == "abort":
            self.requests_aborted.inc()
        elif reason == "error":
            self.requests_failed.inc()
        else:
            self._request_success.labels(self.model_name, reason).inc()
        self.request_generation_tokens.observe(num_generation_tokens)
        if num_prompt_tokens is not None:
            self.request_prompt_tokens.observe(num_prompt_tokens)
        spans = (
            (self.request_queue_time, metrics.arrival_time, metrics.first_scheduled_time),
            (self.request_prefill_time, metrics.first_scheduled_time, metrics.first_token_time),
            (self.time_to_first_token, metrics.arrival_time, metrics.first_token_time),
            (self.request_decode_time, metrics.first_token_time, metrics.last_token_time),
            (self.e2e_request_latency, metrics.arrival_time, metrics.finished_time),
        )
        for histogram, start, end in spans:
            seconds = _span(start, end)
            if seconds is not None:
                histogram.observe(seconds)
        decode = _span(metrics.first_token_time, metrics.last_token_time)
        if record_itl and decode is not None and num_generation_tokens > 1:
            self.observe_token_gap(decode, num_generation_tokens - 1)

    def observe_token_gap(self, seconds: float, count: int = 1) -> None:
        """Record ``count`` tokens that arrived ``seconds`` after the previous one, as ``count`` equal gaps."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        gap = max(0.0, seconds) / count
        for _ in range(count):
            self.inter_token_latency.observe(gap)

    def inc_engine_restarts(self) -> None:
        self.engine_restarts.inc()

    def inc_rate_limited(self) -> None:
        self.requests_rate_limited.inc()

    def inc_rejected(self, reason: str) -> None:
        """Count a refused request; ``reason`` is one of ``REJECT_REASONS`` or another snake_case word."""
        self._requests_rejected.labels(self.model_name, _label("reject reason", reason)).inc()

    def render(self) -> tuple[bytes, str]:
        """The registry in Prometheus text format, and its ``Content-Type``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
