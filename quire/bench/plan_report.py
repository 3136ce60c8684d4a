"""``quire plan`` output: the per-level table and the plan with its formulas, the same as JSON, and
an optional chart of latency against load with the SLO lines (matplotlib, only when plotting)."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from quire.bench.plan import LevelCapacity, Plan
from quire.bench.plot import _import_pyplot


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_levels(plan: Plan) -> str:
    """One row per benchmark level: throughput, latencies at the SLO percentile, the verdict."""
    p = f"p{plan.slo.percentile}"
    headers = ("level", "req/s", "out tok/s", "tokens/h", f"TTFT {p}", f"TPOT {p}", "E2E mean", "meets SLO")
    rows = [
        (
            level.name,
            _num(level.req_s, 2),
            _num(level.output_tok_s),
            f"{level.tokens_per_hour:.3g}",
            _num(level.ttft_ms),
            _num(level.tpot_ms, 2),
            _num(level.e2e_mean_ms),
            "yes" if level.meets_slo else f"no ({level.why_not})",
        )
        for level in plan.levels
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    # The verdict column is last and free text: left-aligned, not padded.
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers[:-1], widths, strict=False)) + "  " + headers[-1]]
    lines += [
        "  ".join(c.rjust(w) for c, w in zip(row[:-1], widths, strict=False)) + "  " + row[-1] for row in rows
    ]
    lines.append("latencies in ms; tokens/h = (prompt + output) tokens per hour")
    return "\n".join(lines)


def _offered_text(plan: Plan) -> str:
    load = plan.load
    shape = f"input {load.input_len} + output {load.output_len} tokens a request"
    return f"{load.req_s:.3g} req/s = {load.tok_h:.3g} tokens/h ({shape})"


def format_plan(plan: Plan) -> str:
    """The plan, each number with the one-line formula that produced it."""
    cap, unit, h = plan.capacity, plan.unit, plan.headroom
    ratio = plan.offered / plan.capacity_per_replica
    w_s = (cap.e2e_mean_ms or 0.0) / 1000
    lines = [
        f"SLO: {plan.slo.describe()}",
        f"capacity per replica ({cap.name}, highest req/s meeting the SLO): {cap.req_s:.3g} req/s = "
        f"{cap.output_tok_s:.1f} output tok/s = {cap.tokens_per_hour:.3g} tokens/h",
        f"offered load: {_offered_text(plan)}",
        f"replicas before headroom = ceil(offered / capacity) = ceil({plan.offered:.4g} / "
        f"{plan.capacity_per_replica:.4g} {unit}) = ceil({ratio:.3f}) = {plan.replicas_before_headroom}",
        f"replicas with headroom   = ceil(offered * h / capacity) = ceil({plan.offered:.4g} * {h:g} / "
        f"{plan.capacity_per_replica:.4g}) = ceil({ratio * h:.3f}) = {plan.replicas}",
        f"utilization per replica  = offered / (replicas * capacity) = {plan.utilization:.0%}",
        f"busy slots per replica   = a = lambda * W (Little) = {plan.per_replica_req_s:.3g} req/s * "
        f"{w_s:.3g} s (mean E2E at {cap.name}) = {plan.busy:.2f} of S = {plan.slots} slots",
        f"queue depth per replica  = Lq = ErlangC(S, a) * rho / (1 - rho), rho = a / S = "
        f"{plan.busy / plan.slots:.2f} -> {_queue(plan.queue_depth)} waiting",
        f"wait for a slot          = Wq = Lq / lambda (Little) = {_queue(plan.queue_wait_s * 1000)} ms; "
        f"in system L = a + Lq = {_queue(plan.in_system)} requests",
        f"serve each replica with --max-num-seqs {plan.slots} (S: the batch that met the SLO), so excess "
        "load waits where quire:num_requests_waiting counts it",
        f"assumes the benchmarked server ran with --max-num-seqs >= {plan.slots}: a smaller one queued "
        "part of the level inside the server, so its latencies already hold waiting counted again above",
    ]
    lines.append(_hpa_line(plan))
    if plan.mode == "offline":
        lines.append(
            "note: offline results time one batch that arrives at once (latencies include its queueing); "
            "quire bench serve measures a server under load"
        )
    return "\n".join(lines)


def _queue(value: float) -> str:
    return "unbounded" if math.isinf(value) else f"{value:.2f}"


def _hpa_line(plan: Plan) -> str:
    cap = plan.capacity
    if plan.hpa_target is None:
        return "HPA target: none without --slo-ttft-ms (waiting only delays the first token)"
    return (
        f"HPA target (quire:num_requests_waiting, AverageValue per pod) = mu * (SLO TTFT - TTFT) / h = "
        f"{cap.req_s:.3g} * ({plan.slo.ttft_ms:g} - {cap.ttft_ms:.1f}) ms / {plan.headroom:g} = "
        f'{plan.hpa_target:.2f} -> averageValue: "{hpa_quantity(plan.hpa_target)}" (deploy/k8s/hpa.yaml)'
    )


def hpa_quantity(value: float) -> str:
    """A Kubernetes quantity for an HPA target: whole numbers plain, the rest in milli-units."""
    milli = max(1, round(value * 1000))
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The plan as plain JSON-ready data (``quire plan --json``)."""
    data = asdict(plan)
    for key in ("queue_depth", "queue_wait_s", "in_system"):
        # Strict JSON has no Infinity: an unbounded queue (utilization 100%) is null.
        data[key] = data[key] if math.isfinite(data[key]) else None
    data["unit"] = plan.unit
    data["utilization"] = plan.utilization
    data["hpa_quantity"] = None if plan.hpa_target is None else hpa_quantity(plan.hpa_target)
    data["metric"] = "quire:num_requests_waiting"
    return data


def _load_axis(level: LevelCapacity) -> float:
    # Achieved requests/s: the load each level put on the replica, closed-loop or Poisson alike.
    return level.req_s


def plot_plan(plan: Plan, out: str | Path) -> None:
    """TTFT and TPOT at the SLO percentile against each level's load (req/s), the SLO as a
    horizontal line, and the per-replica load of the plan as a vertical one."""
    plt = _import_pyplot()
    p = f"p{plan.slo.percentile}"
    panels = (
        (f"TTFT {p} (ms)", "ttft_ms", plan.slo.ttft_ms),
        (f"TPOT {p} (ms)", "tpot_ms", plan.slo.tpot_ms),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 4))
    try:
        for ax, (title, attr, target) in zip(axes, panels, strict=True):
            points = sorted(
                (_load_axis(level), getattr(level, attr), level.meets_slo, level.name)
                for level in plan.levels
                if getattr(level, attr) is not None
            )
            if points:
                ax.plot([pt[0] for pt in points], [pt[1] for pt in points], color="tab:blue", zorder=1)
                for x, y, ok, name in points:
                    ax.scatter(x, y, color="tab:green" if ok else "tab:red", zorder=2)
                    ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            if target is not None:
                ax.axhline(target, color="tab:red", linestyle="--", label=f"SLO {target:g} ms")
            ax.axvline(plan.per_replica_req_s, color="gray", linestyle=":", label="planned load per replica")
            ax.set_title(title)
            ax.set_xlabel("load per replica (req/s)")
            ax.grid(True, alpha=0.3)
            ax.legend()
        fig.suptitle(f"{plan.replicas} replicas (headroom {plan.headroom:g}); green: meets the SLO")
        fig.tight_layout()
        fig.savefig(out, dpi=120)
    finally:
        plt.close(fig)
