"""Capacity planning from a saved serving benchmark (``quire bench serve --save``): which load levels
meet a latency SLO, how many replicas an offered load needs, the queue Little's law predicts, and
the Kubernetes HPA target on ``quire:num_requests_waiting`` that follows.

Pure arithmetic on a loaded :class:`BenchRun`, no I/O, so every number is checkable by hand.

Definitions (``quire plan`` prints each as a one-line formula):

- A level *meets the SLO* when none of its requests failed and its TTFT and TPOT at the chosen
  percentile (p50, p90 or p99 of the benchmark) are within the targets; a target not given is not
  checked.
- *Capacity per replica* is the SLO-meeting level with the highest request throughput ``mu``
  (requests/s); its output tokens/s and total tokens/h are the same level's.
- *Offered load* is requests/s, or tokens/hour counting prompt + output tokens (the benchmark's
  "total tok/s" times 3600), at the benchmark's own prompt and output lengths.
- ``replicas = ceil(offered / capacity)``, in the unit the load was given in; with headroom ``h``
  ``ceil(offered * h / capacity)``.
- Queueing, per replica, modelled as M/M/S (Poisson arrivals, S slots): arrivals
  ``lambda`` = offered requests/s / replicas; each request holds a slot for ``W``, the mean
  end-to-end latency at the capacity level (measured at full capacity, so conservative below it).
  The slots ``S`` are the requests in flight when capacity was measured: the level's concurrency
  for a closed-loop level, else ``ceil(mu * W)`` (Little's law on the measurement). Little's law
  gives the busy slots ``a = lambda * W``; Erlang C gives the expected queue depth (waiting, not
  running) ``Lq = C(S, a) * rho / (1 - rho)`` with ``rho = a / S``; Little's law again gives the
  mean wait for a slot ``Wq = Lq / lambda`` and requests in the system ``L = a + Lq``. This holds
  when the server's ``--max-num-seqs`` is ``S``: then a replica never batches past the size that
  met the SLO, and the excess waits in the queue, where the HPA sees it.
- HPA target: a request behind ``q`` waiting requests waits about ``q / mu`` seconds for a slot, so
  the TTFT slack at the capacity level, ``slo_ttft - ttft``, absorbs a queue of
  ``mu * slack`` requests. The target (``AverageValue`` of waiting requests per pod) is that queue
  divided by the headroom, so scale-up starts before queueing uses the whole slack.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from quire.bench.report import BenchRun, level_name
from quire.bench.stats import LevelResult

PERCENTILES = (50, 90, 99)
# Below this the target would round to "any waiting request at all"; Kubernetes needs a value > 0.
MIN_HPA_TARGET = 0.1
SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class PlanSLO:
    """Latency targets a replica must meet, at one percentile of the benchmark's distribution."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    percentile: int = 99

    def __post_init__(self) -> None:
        if self.ttft_ms is None and self.tpot_ms is None:
            raise ValueError("give an SLO to plan for: --slo-ttft-ms and/or --slo-tpot-ms")
        for name in ("ttft_ms", "tpot_ms"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"SLO {name} must be a positive number of milliseconds, got {value}")
        if self.percentile not in PERCENTILES:
            raise ValueError(
                f"percentile must be one of {PERCENTILES} (what a benchmark saves), got {self.percentile}"
            )

    def describe(self) -> str:
        p = f"p{self.percentile}"
        parts = [f"TTFT {p} <= {self.ttft_ms:g} ms"] if self.ttft_ms is not None else []
        parts += [f"TPOT {p} <= {self.tpot_ms:g} ms"] if self.tpot_ms is not None else []
        return ", ".join(parts)


@dataclass(frozen=True)
class OfferedLoad:
    """The load to plan for: ``request_rate`` requests/s or ``tokens_per_hour`` prompt + output
    tokens/hour (exactly one), of requests with ``input_len`` prompt and ``output_len`` output tokens."""

    input_len: int
    output_len: int
    request_rate: float | None = None
    tokens_per_hour: float | None = None

    def __post_init__(self) -> None:
        check_offered(self.request_rate, self.tokens_per_hour)
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError(
                f"input and output lengths must be >= 1 token, got {self.input_len}/{self.output_len}"
            )

    @property
    def by_tokens(self) -> bool:
        return self.tokens_per_hour is not None

    @property
    def tokens_per_request(self) -> int:
        return self.input_len + self.output_len

    @property
    def req_s(self) -> float:
        if self.request_rate is not None:
            return self.request_rate
        return self.tokens_per_hour / SECONDS_PER_HOUR / self.tokens_per_request

    @property
    def tok_h(self) -> float:
        if self.tokens_per_hour is not None:
            return self.tokens_per_hour
        return self.request_rate * self.tokens_per_request * SECONDS_PER_HOUR


def check_offered(request_rate: float | None, tokens_per_hour: float | None) -> None:
    """Exactly one of the two, positive and finite (checked before a benchmark runs, too)."""
    if (request_rate is None) == (tokens_per_hour is None):
        raise ValueError("give the offered load as exactly one of --rate or --tokens-per-hour")
    given = request_rate if request_rate is not None else tokens_per_hour
    if not (math.isfinite(given) and given > 0):
        raise ValueError(f"the offered load must be a positive number, got {given}")


@dataclass(frozen=True)
class LevelCapacity:
    """One benchmark level as the planner sees it: its throughput, its latencies at the SLO's
    percentile, and whether it meets the SLO (``why_not`` says why not)."""

    name: str
    concurrency: int | None
    request_rate: float | None
    req_s: float
    output_tok_s: float
    total_tok_s: float
    ttft_ms: float | None
    tpot_ms: float | None
    e2e_mean_ms: float | None
    meets_slo: bool
    why_not: str = ""

    def __post_init__(self) -> None:
        if self.meets_slo == bool(self.why_not):
            raise ValueError("a level meets the SLO exactly when it has no why_not reason")

    @property
    def tokens_per_hour(self) -> float:
        return self.total_tok_s * SECONDS_PER_HOUR

    @property
    def slots(self) -> int:
        """Requests in flight while this level was measured (see the module docstring)."""
        if self.request_rate is None and self.concurrency is not None:
            return self.concurrency
        in_flight = math.ceil(self.req_s * (self.e2e_mean_ms or 0.0) / 1000)
        cap = self.concurrency if self.concurrency is not None else in_flight
        return max(1, min(cap, in_flight))


def _at(stat: Any, percentile: int) -> float | None:
    return getattr(stat, f"p{percentile}")


def _misses(slo: PlanSLO, ttft: float | None, tpot: float | None) -> list[str]:
    p = f"p{slo.percentile}"
    out = []
    for metric, value, target in (("TTFT", ttft, slo.ttft_ms), ("TPOT", tpot, slo.tpot_ms)):
        if target is None:
            continue
        if value is None:
            out.append(f"no {metric} data")
        elif value > target:
            out.append(f"{metric} {p} {value:.1f} > {target:g} ms")
    return out


def assess_level(level: LevelResult, slo: PlanSLO) -> LevelCapacity:
    """The planner's view of one level: does it meet ``slo``, and what does it carry."""
    ttft, tpot = _at(level.ttft_ms, slo.percentile), _at(level.tpot_ms, slo.percentile)
    reasons = [f"{level.failed} failed"] if level.failed else []
    if level.ok == 0:
        reasons.append("no successful requests")
    reasons += _misses(slo, ttft, tpot)
    return LevelCapacity(
        name=level_name(level),
        concurrency=level.concurrency,
        request_rate=level.request_rate,
        req_s=level.req_s,
        output_tok_s=level.output_tok_s,
        total_tok_s=level.total_tok_s,
        ttft_ms=ttft,
        tpot_ms=tpot,
        e2e_mean_ms=level.e2e_ms.mean,
        meets_slo=not reasons,
        why_not="; ".join(reasons),
    )


def assess_run(run: BenchRun, slo: PlanSLO) -> tuple[LevelCapacity, ...]:
    """Every level of ``run`` assessed against ``slo``; refuses results without latencies."""
    if not run.levels:
        raise ValueError("the bench results hold no levels to plan from")
    if all(level.ttft_ms.p50 is None and level.tpot_ms.p50 is None for level in run.levels):
        raise ValueError(
            f"the bench results (mode {run.mode!r}) hold no TTFT/TPOT latencies, so no SLO can be "
            "checked; measure with quire bench serve --save"
        )
    return tuple(assess_level(level, slo) for level in run.levels)


def _closeness(level: LevelCapacity, slo: PlanSLO) -> float:
    # How far past its targets a level is (max of latency / target); the smallest is the nearest miss.
    ratios = [
        value / target
        for value, target in ((level.ttft_ms, slo.ttft_ms), (level.tpot_ms, slo.tpot_ms))
        if target is not None and value is not None
    ]
    return max(ratios, default=math.inf)


def pick_capacity(levels: Sequence[LevelCapacity], slo: PlanSLO) -> LevelCapacity:
    """The SLO-meeting level with the highest requests/s: what one replica carries within the SLO."""
    meeting = [level for level in levels if level.meets_slo]
    if meeting:
        return max(meeting, key=lambda level: level.req_s)
    nearest = min(levels, key=lambda level: _closeness(level, slo))
    raise ValueError(
        f"no benchmark level meets the SLO ({slo.describe()}); the nearest, {nearest.name}, has "
        f"{nearest.why_not}. Relax the SLO or benchmark lower concurrency / request rates"
    )


def replicas_for(offered: float, capacity: float, headroom: float = 1.0) -> int:
    """``ceil(offered * headroom / capacity)``, at least 1."""
    if not (capacity > 0 and math.isfinite(capacity)):
        raise ValueError(f"capacity per replica must be > 0, got {capacity}")
    if not (offered > 0 and math.isfinite(offered)):
        raise ValueError(f"offered load must be > 0, got {offered}")
    check_headroom(headroom)
    # Rounded first so float noise (2.0000000000000004) does not buy a whole replica.
    return max(1, math.ceil(round(offered * headroom / capacity, 9)))


def check_headroom(headroom: float) -> None:
    if not (math.isfinite(headroom) and headroom >= 1.0):
        raise ValueError(f"headroom must be >= 1.0 (1.3 = 30% spare capacity), got {headroom}")


def littles_law(arrival_req_s: float, latency_s: float) -> float:
    """``L = lambda * W``: mean requests in the system for arrivals at ``lambda``/s staying ``W`` s."""
    if arrival_req_s < 0 or latency_s < 0:
        raise ValueError(f"Little's law needs lambda >= 0 and W >= 0, got {arrival_req_s}, {latency_s}")
    return arrival_req_s * latency_s


def erlang_c_queue(slots: int, busy: float) -> float:
    """Expected requests waiting in an M/M/``slots`` queue carrying ``busy`` Erlangs (lambda * W);
    infinite when ``busy >= slots`` (the queue grows without bound)."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    if busy < 0:
        raise ValueError(f"busy slots must be >= 0, got {busy}")
    if busy >= slots:
        return math.inf
    # Erlang B by its recurrence (no a^S / S! overflow at hundreds of slots), then Erlang C from it.
    blocking = 1.0
    for k in range(1, slots + 1):
        blocking = busy * blocking / (k + busy * blocking)
    wait_probability = slots * blocking / (slots - busy * (1 - blocking))
    rho = busy / slots
    return wait_probability * rho / (1 - rho)


def hpa_waiting_target(capacity: LevelCapacity, slo: PlanSLO, headroom: float) -> float | None:
    """Waiting requests per pod to target (see the module docstring); None without a TTFT SLO,
    since queueing delays only the first token."""
    check_headroom(headroom)
    if slo.ttft_ms is None or capacity.ttft_ms is None:
        return None
    slack_s = max(0.0, slo.ttft_ms - capacity.ttft_ms) / 1000
    return max(MIN_HPA_TARGET, capacity.req_s * slack_s / headroom)


def benchmark_lengths(run: BenchRun) -> tuple[int, int] | None:
    """(input_len, output_len) the benchmark ran with, from its saved config; None if not recorded."""
    workload = run.config.get("workload") or {}
    lengths = (workload.get("input_len"), workload.get("output_len"))
    return lengths if all(isinstance(n, int) for n in lengths) else None


def resolve_lengths(run: BenchRun, input_len: int | None, output_len: int | None) -> tuple[int, int]:
    """The request shape to plan for: the benchmark's own; given lengths must match it, because
    capacity measured at one shape says little about another."""
    measured = benchmark_lengths(run)
    if measured is None:
        if input_len is None or output_len is None:
            raise ValueError(
                "the bench results do not record their prompt/output lengths; give --input-len and --output-len"
            )
        return input_len, output_len
    wanted = (
        measured[0] if input_len is None else input_len,
        measured[1] if output_len is None else output_len,
    )
    if wanted != measured:
        raise ValueError(
            f"capacity was measured at input {measured[0]} / output {measured[1]} tokens, not "
            f"{wanted[0]} / {wanted[1]}; benchmark that shape (quire bench serve --input-len "
            f"{wanted[0]} --output-len {wanted[1]} --save ...) and plan from it"
        )
    return measured


@dataclass(frozen=True)
class Plan:
    """The outcome: every level's verdict, the capacity level, and what the offered load needs.

    ``offered`` and ``capacity_per_replica`` are in the load's unit (req/s, or tokens/h when the
    load was given in tokens); the queueing numbers are per replica at ``replicas`` (after
    headroom): ``busy`` = a, ``queue_depth`` = Lq, ``queue_wait_s`` = Wq, ``in_system`` = L."""

    slo: PlanSLO
    load: OfferedLoad
    headroom: float
    mode: str
    levels: tuple[LevelCapacity, ...]
    capacity: LevelCapacity
    offered: float
    capacity_per_replica: float
    replicas_before_headroom: int
    replicas: int
    per_replica_req_s: float
    slots: int
    busy: float
    queue_depth: float
    queue_wait_s: float
    in_system: float
    hpa_target: float | None

    @property
    def unit(self) -> str:
        return "tokens/h" if self.load.by_tokens else "req/s"

    @property
    def utilization(self) -> float:
        """Share of each replica's SLO capacity the offered load uses at ``replicas``."""
        return self.offered / (self.replicas * self.capacity_per_replica)


def make_plan(run: BenchRun, slo: PlanSLO, load: OfferedLoad, headroom: float = 1.3) -> Plan:
    """Plan ``load`` on replicas like the one benchmarked in ``run`` (definitions: module docstring)."""
    check_headroom(headroom)
    measured = benchmark_lengths(run)
    if measured is not None and measured != (load.input_len, load.output_len):
        raise ValueError(
            f"the load's lengths {load.input_len}/{load.output_len} differ from the benchmark's "
            f"{measured[0]}/{measured[1]}; use resolve_lengths()"
        )
    levels = assess_run(run, slo)
    capacity = pick_capacity(levels, slo)
    offered = load.tok_h if load.by_tokens else load.req_s
    per_replica = capacity.tokens_per_hour if load.by_tokens else capacity.req_s
    replicas = replicas_for(offered, per_replica, headroom)
    arrival = load.req_s / replicas
    busy = littles_law(arrival, (capacity.e2e_mean_ms or 0.0) / 1000)
    queue = erlang_c_queue(capacity.slots, busy)
    return Plan(
        slo=slo,
        load=load,
        headroom=headroom,
        mode=run.mode,
        levels=levels,
        capacity=capacity,
        offered=offered,
        capacity_per_replica=per_replica,
        replicas_before_headroom=replicas_for(offered, per_replica),
        replicas=replicas,
        per_replica_req_s=arrival,
        slots=capacity.slots,
        busy=busy,
        queue_depth=queue,
        queue_wait_s=queue / arrival,
        in_system=busy + queue,
        hpa_target=hpa_waiting_target(capacity, slo, headroom),
    )
