"""Plot saved runs: output throughput and p99 TTFT / TPOT against the load level, one line per run.

matplotlib is optional (the ``bench`` extra) and imported only here, only when plotting.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from quire.bench.report import BenchRun


def _import_pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ValueError(
            "plotting needs matplotlib: pip install 'quire[bench]' (or pip install matplotlib)"
        ) from exc
    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    return plt


def _x_axis(runs: Sequence[BenchRun]) -> tuple[str, str]:
    # Request-rate runs are plotted against the rate, concurrency sweeps against concurrency; one
    # chart cannot share an x axis between the two.
    by_rate = {all(level.request_rate is not None for level in run.levels) for run in runs}
    if len(by_rate) > 1:
        raise ValueError(
            "cannot overlay request-rate runs and concurrency sweeps in one chart; plot them apart"
        )
    if by_rate == {True}:
        return "request_rate", "request rate (req/s)"
    return "concurrency", "concurrency"


def plot_runs(runs: Sequence[BenchRun], out: str | Path) -> None:
    if not runs:
        raise ValueError("nothing to plot: give at least one results file")
    plt = _import_pyplot()
    from matplotlib import ticker

    attr, xlabel = _x_axis(runs)
    panels = (
        ("output tokens/s", lambda r: r.output_tok_s),
        ("p99 TTFT (ms)", lambda r: r.ttft_ms.p99),
        ("p99 TPOT (ms)", lambda r: r.tpot_ms.p99),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    try:
        for ax, (title, get) in zip(axes, panels, strict=True):
            for index, run in enumerate(runs):
                points = [
                    (getattr(level, attr), get(level))
                    for level in run.levels
                    if getattr(level, attr) is not None and get(level) is not None
                ]
                if not points:
                    continue
                xs, ys = zip(*sorted(points), strict=True)
                ax.plot(xs, ys, marker="o", label=run.label or f"run {index + 1}")
            ax.set_title(title)
            ax.set_xlabel(xlabel)
            if attr == "concurrency":
                ax.set_xscale("log", base=2)
                ax.xaxis.set_major_formatter(ticker.ScalarFormatter())  # 1, 8, 32 rather than 2^k
            ax.grid(True, alpha=0.3)
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(out, dpi=120)
    finally:
        plt.close(fig)
