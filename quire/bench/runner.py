"""Drive a whole benchmark: every load level of a sweep against a server, or one offline batch."""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from quire.bench.client import ServeTarget, fetch_vocab_size, run_level
from quire.bench.report import BenchRun
from quire.bench.stats import SLO, LevelResult, RequestRecord, aggregate
from quire.bench.workload import WARMUP, WorkloadConfig, arrival_offsets, fit_to_vocab, make_prompts


@dataclass(frozen=True)
class SweepConfig:
    """The load levels. With ``request_rates`` each rate is a level (Poisson arrivals) and
    ``concurrency`` holds at most one value, an optional cap on requests in flight; without, each
    concurrency value is a level of closed-loop clients."""

    concurrency: tuple[int, ...] = (1, 8, 32)
    request_rates: tuple[float, ...] = ()
    warmup: int = 0
    slo: SLO = field(default_factory=SLO)

    def __post_init__(self) -> None:
        if any(c < 1 for c in self.concurrency):
            raise ValueError(f"concurrency levels must be >= 1, got {self.concurrency}")
        if any(r <= 0 for r in self.request_rates):
            raise ValueError(f"request rates must be > 0, got {self.request_rates}")
        if self.request_rates and len(self.concurrency) > 1:
            raise ValueError(
                "with --request-rate, --concurrency is a single cap on requests in flight, not a sweep"
            )
        if not self.request_rates and not self.concurrency:
            raise ValueError("give at least one concurrency level or request rate")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")

    def levels(self) -> list[tuple[int | None, float | None]]:
        """(concurrency, request_rate) of each level, in run order."""
        if self.request_rates:
            cap = self.concurrency[0] if self.concurrency else None
            return [(cap, rate) for rate in self.request_rates]
        return [(c, None) for c in self.concurrency]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, disable=not enabled, leave=False)


def run_serve(
    target: ServeTarget,
    workload: WorkloadConfig,
    sweep: SweepConfig,
    *,
    label: str = "",
    progress: bool = True,
) -> BenchRun:
    vocab = fetch_vocab_size(target)
    if vocab is not None:
        workload = fit_to_vocab(workload, vocab)
    elif progress:
        print(
            f"note: the server does not report its vocabulary size; prompt token ids are drawn from "
            f"[{workload.vocab_lo}, {workload.vocab_hi}) (--vocab-lo/--vocab-hi)",
            file=sys.stderr,
        )
    results: list[LevelResult] = []
    for index, (concurrency, rate) in enumerate(sweep.levels()):
        # Fresh prompts per level (and per warm-up): a prefix cache must not carry work across.
        prompts = make_prompts(workload, index)
        warm = make_prompts(workload, index, count=sweep.warmup, purpose=WARMUP)
        arrivals = arrival_offsets(workload, index, rate, len(prompts)) if rate is not None else None
        desc = f"c={concurrency}" if rate is None else f"rate={rate:g}"
        bar = _progress(len(prompts), desc, progress)
        try:
            records, wall = asyncio.run(
                run_level(
                    target,
                    prompts,
                    workload.output_len,
                    concurrency=concurrency,
                    arrivals=arrivals,
                    warmup_prompts=warm,
                    on_done=lambda _record, bar=bar: bar.update(1),
                )
            )
        finally:
            bar.close()
        results.append(aggregate(records, wall, concurrency=concurrency, request_rate=rate, slo=sweep.slo))
    config = {
        "base_url": target.base_url,  # never the API key: result files get shared
        "model": target.model,
        "temperature": target.temperature,
        "workload": asdict(workload),
        "sweep": asdict(sweep),
    }
    return BenchRun(mode="serve", levels=tuple(results), label=label, config=config)


def run_offline(
    engine_kwargs: dict[str, Any],
    workload: WorkloadConfig,
    *,
    warmup: int = 0,
    label: str = "",
    progress: bool = True,
) -> BenchRun:
    """The same prompts through ``LLM.generate`` in this process; the level's concurrency is the
    engine's ``max_num_seqs``. Latencies come from the engine's own request timings and include
    queueing, since the whole batch arrives at once."""
    from quire.entrypoints.llm import LLM
    from quire.sampling import SamplingParams

    llm = LLM(**engine_kwargs)
    workload = fit_to_vocab(workload, llm.engine.info.vocab_size)
    params = SamplingParams(max_tokens=workload.output_len, ignore_eos=True, temperature=0.0)
    if warmup:
        llm.generate(_as_inputs(make_prompts(workload, 0, count=warmup, purpose=WARMUP)), params)
    prompts = make_prompts(workload, 0)
    t0 = time.perf_counter()
    outputs = llm.generate(_as_inputs(prompts), params, use_tqdm=progress)
    wall = time.perf_counter() - t0
    records = [_offline_record(output) for output in outputs]
    level = aggregate(records, wall, concurrency=int(engine_kwargs.get("max_num_seqs", 64)))
    config = {
        "engine": {k: v for k, v in engine_kwargs.items()},
        "workload": asdict(workload),
        "warmup": warmup,
    }
    return BenchRun(mode="offline", levels=(level,), label=label, config=config)


def _as_inputs(prompts: list[list[int]]) -> list[dict[str, Any]]:
    return [{"prompt_token_ids": p} for p in prompts]


def _offline_record(output: Any) -> RequestRecord:
    completion = output.outputs[0]
    metrics = output.metrics
    e2e, ttft = 0.0, None
    if metrics is not None and metrics.finished_time is not None:
        e2e = max(0.0, metrics.finished_time - metrics.arrival_time)
        if metrics.first_token_time is not None:
            ttft = metrics.first_token_time - metrics.arrival_time
    return RequestRecord(
        ok=True,
        e2e_s=e2e,
        ttft_s=ttft,
        output_tokens=len(completion.token_ids),
        prompt_tokens=len(output.prompt_token_ids),
    )
