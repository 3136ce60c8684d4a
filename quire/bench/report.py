"""A benchmark run: its table on the terminal and its JSON file (the input of ``quire bench plot``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quire.bench.stats import LevelResult

FORMAT_VERSION = 1
MODES = ("serve", "offline")


@dataclass(frozen=True)
class BenchRun:
    """Everything one ``quire bench`` invocation measured, plus what it was asked to do."""

    mode: str
    levels: tuple[LevelResult, ...]
    label: str = ""
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        object.__setattr__(self, "levels", tuple(self.levels))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "mode": self.mode,
            "label": self.label,
            "config": self.config,
            "levels": [level.to_dict() for level in self.levels],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchRun:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"unsupported bench results format_version {version!r} (expected {FORMAT_VERSION})"
            )
        return cls(
            mode=data["mode"],
            label=data.get("label", ""),
            config=data.get("config", {}),
            levels=tuple(LevelResult.from_dict(level) for level in data["levels"]),
        )


def save_run(run: BenchRun, path: str | Path) -> None:
    # allow_nan=False: a NaN would make the file unreadable to strict JSON parsers; stats already
    # turns "no data" into None.
    Path(path).write_text(json.dumps(run.to_dict(), indent=2, allow_nan=False) + "\n")


def load_run(path: str | Path) -> BenchRun:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read bench results {path}: {exc}") from exc
    return BenchRun.from_dict(data)


def level_name(level: LevelResult) -> str:
    parts = []
    if level.concurrency is not None:
        parts.append(f"c={level.concurrency}")
    if level.request_rate is not None:
        parts.append(f"rate={level.request_rate:g}")
    return " ".join(parts) or "-"


def _num(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


# (header, getter) for each column; latency columns are milliseconds.
_COLUMNS = (
    ("level", level_name),
    ("ok", lambda r: str(r.ok)),
    ("failed", lambda r: str(r.failed)),
    ("out tok/s", lambda r: _num(r.output_tok_s)),
    ("total tok/s", lambda r: _num(r.total_tok_s)),
    ("req/s", lambda r: _num(r.req_s, 2)),
    ("elapsed s", lambda r: _num(r.wall_s, 2)),
    ("goodput", lambda r: _num(r.goodput_req_s, 2)),
    ("TTFT p50", lambda r: _num(r.ttft_ms.p50)),
    ("TTFT p90", lambda r: _num(r.ttft_ms.p90)),
    ("TTFT p99", lambda r: _num(r.ttft_ms.p99)),
    ("TPOT p50", lambda r: _num(r.tpot_ms.p50, 2)),
    ("TPOT p90", lambda r: _num(r.tpot_ms.p90, 2)),
    ("TPOT p99", lambda r: _num(r.tpot_ms.p99, 2)),
    ("ITL p50", lambda r: _num(r.itl_ms.p50, 2)),
    ("ITL p90", lambda r: _num(r.itl_ms.p90, 2)),
    ("ITL p99", lambda r: _num(r.itl_ms.p99, 2)),
    ("E2E p50", lambda r: _num(r.e2e_ms.p50)),
    ("E2E p90", lambda r: _num(r.e2e_ms.p90)),
    ("E2E p99", lambda r: _num(r.e2e_ms.p99)),
)


def format_table(run: BenchRun) -> str:
    """A fixed-width table, one row per level; latencies in ms, '-' where there is no data."""
    headers = [name for name, _ in _COLUMNS]
    rows = [[get(level) for _, get in _COLUMNS] for level in run.levels]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    lines = []
    if run.label:
        lines.append(f"[{run.label}]")
    lines.append("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    lines.extend("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)
    lines.append("latencies in ms; goodput = requests/s meeting the SLOs ('-': no SLO given)")
    errors = [f"{level_name(r)}: {r.first_error}" for r in run.levels if r.first_error]
    lines.extend(f"first error at {e}" for e in errors)
    return "\n".join(lines)
