#!/usr/bin/env python3
"""The transformers baseline: ``model.generate()`` in this process, fp32, greedy, no server.

It sees the very prompts ``quire bench serve`` sends (``quire.bench.workload.make_prompts`` with the
same seed, lengths and token-id range), with EOS suppressed until ``output_len`` tokens, and it saves
a ``quire bench`` results file (``BenchRun``), so ``quire bench plot`` and run.py read it like any
server's. Two kinds of level:

* serial (concurrency 1): one request at a time, the first ``--serial-requests`` prompts of the
  concurrency-1 level. TTFT and TPOT are each request's own, as a client at concurrency 1 sees them.
* static batch of B (concurrency B): the level's prompts in batches of B, one batch after another.
  Every request of a batch gets the batch's first-token time as its TTFT and the batch's time per
  step as its TPOT, each measured from the start of *its own batch*: exactly what a closed-loop client
  at concurrency B sees (it sends the next B requests when the previous B finish, and they all finish
  together). The saved config also holds TTFT measured from t=0 for the whole level, as if all
  requests had been submitted at once, which charges later batches for waiting on earlier ones.

Each token's time is taken by a streamer, called by generate() after each step's sampling.

    python benchmarks/compare/hf_generate.py --model DIR --concurrency 1,32 --batch-sizes 8,32 \
        --serial-requests 16 --save transformers.json
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from quire.bench.report import BenchRun, format_table, save_run
from quire.bench.stats import LevelResult, Percentiles, RequestRecord, aggregate
from quire.bench.workload import WARMUP, WorkloadConfig, make_prompts

TTFT_DEFINITION = (
    "serial: from each request's own start; static batch: from the start of the request's batch "
    "(a closed-loop client at concurrency = batch size); config.ttft_from_t0_ms holds TTFT from t=0 "
    "with all requests of the level submitted at once"
)


class StepClock:
    """A generate() streamer that stamps each decoding step; its first put() is the prompt."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stamps: list[float] = []
        self._seen_prompt = False

    def put(self, value: Any) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.stamps.append(time.perf_counter() - self.start)

    def end(self) -> None:
        pass


def load_model(model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    return model


def timed_generate(model: Any, prompts: list[list[int]], output_len: int) -> StepClock:
    """One generate() over ``prompts`` (all the same length, so no padding), exactly ``output_len``
    greedy tokens each; returns the step times from the call's start."""
    import torch

    input_ids = torch.tensor(prompts, dtype=torch.long)
    pad = model.generation_config.pad_token_id
    if pad is None:
        eos = model.generation_config.eos_token_id
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    clock = StepClock()
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=output_len,
            min_new_tokens=output_len,  # EOS suppressed: the same work as ignore_eos on the servers
            do_sample=False,
            pad_token_id=pad,
            streamer=clock,
        )
    produced = out.shape[1] - input_ids.shape[1]
    if produced != output_len or len(clock.stamps) != output_len:
        raise RuntimeError(f"generate() made {produced} tokens ({len(clock.stamps)} steps), not {output_len}")
    return clock


def _record(stamps: list[float], prompt_len: int) -> RequestRecord:
    """A request whose steps happened at ``stamps`` seconds after its own send time."""
    return RequestRecord(
        ok=True,
        e2e_s=stamps[-1],
        ttft_s=stamps[0],
        output_tokens=len(stamps),
        prompt_tokens=prompt_len,
        chunk_times=tuple(stamps),
    )


def run_serial(model: Any, prompts: list[list[int]], output_len: int) -> LevelResult:
    records = []
    t0 = time.perf_counter()
    for prompt in prompts:
        clock = timed_generate(model, [prompt], output_len)
        records.append(_record(clock.stamps, len(prompt)))
    wall = time.perf_counter() - t0
    return aggregate(records, wall, concurrency=1)


def run_batched(
    model: Any, prompts: list[list[int]], output_len: int, batch: int
) -> tuple[LevelResult, Percentiles]:
    """The level in static batches of ``batch``; also TTFT percentiles measured from t=0."""
    records, from_t0 = [], []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        clock = timed_generate(model, chunk, output_len)
        started = clock.start - t0
        for prompt in chunk:
            records.append(_record(clock.stamps, len(prompt)))
            from_t0.append(started + clock.stamps[0])
    wall = time.perf_counter() - t0
    return aggregate(records, wall, concurrency=batch), Percentiles.of(from_t0, 1000)


def run(
    model_dir: Path,
    workload: WorkloadConfig,
    concurrency: list[int],
    batch_sizes: list[int],
    serial_requests: int,
    label: str = "transformers",
) -> BenchRun:
    """Serial level first (if 1 is in ``concurrency``), then one level per batch size. Prompts of a
    level come from the quire bench level of the same concurrency (its index in ``concurrency``), or
    from a fresh index past them for a batch size that is no concurrency level."""
    model = load_model(model_dir)
    # Warm-up on prompts no level measures: the first generate() pays one-off costs.
    timed_generate(model, make_prompts(workload, 0, count=1, purpose=WARMUP), 2)

    def level_index(c: int) -> int:
        return concurrency.index(c) if c in concurrency else len(concurrency) + c

    levels: list[LevelResult] = []
    from_t0: dict[str, dict[str, Any]] = {}
    if 1 in concurrency and serial_requests > 0:
        prompts = make_prompts(workload, level_index(1))[:serial_requests]
        print(f"transformers: serial, {len(prompts)} requests", file=sys.stderr, flush=True)
        levels.append(run_serial(model, prompts, workload.output_len))
    for batch in batch_sizes:
        prompts = make_prompts(workload, level_index(batch))
        print(
            f"transformers: static batches of {batch}, {len(prompts)} requests", file=sys.stderr, flush=True
        )
        level, t0_ttft = run_batched(model, prompts, workload.output_len, batch)
        levels.append(level)
        from_t0[str(batch)] = asdict(t0_ttft)
    config = {
        "model": str(model_dir),
        "engine": "transformers generate(), fp32, greedy, EOS suppressed (min_new_tokens)",
        "workload": asdict(workload),
        "serial_requests": serial_requests,
        "batch_sizes": batch_sizes,
        "ttft_definition": TTFT_DEFINITION,
        "ttft_from_t0_ms": from_t0,
    }
    return BenchRun(mode="offline", levels=tuple(levels), label=label, config=config)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--concurrency", type=_ints, default=[1, 32], help="the quire bench levels")
    ap.add_argument("--batch-sizes", type=_ints, default=[8, 32])
    ap.add_argument("--serial-requests", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--vocab-lo", type=int, default=100)
    ap.add_argument("--vocab-hi", type=int, default=30000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default="transformers")
    ap.add_argument("--save", type=Path, required=True)
    a = ap.parse_args()
    workload = WorkloadConfig(
        input_len=a.input_len,
        output_len=a.output_len,
        num_requests=a.num_requests,
        vocab_lo=a.vocab_lo,
        vocab_hi=a.vocab_hi,
        seed=a.seed,
    )
    result = run(a.model, workload, a.concurrency, a.batch_sizes, a.serial_requests, a.label)
    print(format_table(result))
    save_run(result, a.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
