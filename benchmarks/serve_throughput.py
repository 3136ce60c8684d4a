#!/usr/bin/env python3
"""Serving throughput: ``quire serve`` under load, against ``LLM.generate`` offline, in one run.

Starts the server on a free loopback port, drives it with the project's load generator
(``benchmarks/tools/loadgen.py``: streaming /v1/completions, token-id prompts, ignore_eos) at
each concurrency level, stops it, then runs the concurrency-32 level's exact requests offline with
``max_num_seqs`` = 32. Prints a table of output tokens/s and TTFT/TPOT percentiles, and the server's
throughput as a fraction of the offline one: the cost of HTTP, SSE and the process hop.
Machines here are noisy: compare the two numbers from one run, not across runs.

    python benchmarks/serve_throughput.py                  # makes a smollm2-135m-shape checkpoint
    python benchmarks/serve_throughput.py --model DIR --concurrency 1,8,32 --num-requests 64
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from _common import DEFAULT_MODEL, REPO, TOOLS, ensure_model, time_llm_generate

LISTENING = re.compile(r"listening on (http://[0-9.]+:\d+)")
SERVED_NAME = "bench"


def load_loadgen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("loadgen", TOOLS / "loadgen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start_server(model: Path, max_num_seqs: int, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    import httpx

    log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the server
    command = [
        sys.executable, "-m", "quire.entrypoints.cli", "serve", str(model), "--port", "0",
        "--served-model-name", SERVED_NAME, "--dtype", "float32", "--max-num-seqs", str(max_num_seqs),
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 600
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        if url is None:
            match = LISTENING.search(log_path.read_text(errors="replace"))
            url = match.group(1) if match else None
        elif httpx.get(f"{url}/health", timeout=5).status_code == 200:
            return proc, url
        time.sleep(0.2)
    proc.kill()
    sys.exit("server did not become healthy in time")


def id_range(model: Path) -> tuple[int, int]:
    """loadgen's default prompt-id range [1000, 20000), cut to a smaller model's vocabulary."""
    vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
    return (1000, 20000) if vocab >= 20000 else (min(1000, vocab // 2), vocab)


def run_loadgen(url: str, a: argparse.Namespace, ids: tuple[int, int]) -> list[dict]:
    command = [
        sys.executable, str(TOOLS / "loadgen.py"), "--base-url", url, "--model", SERVED_NAME,
        "--input-len", str(a.input_len), "--output-len", str(a.output_len), "--num-requests", str(a.num_requests),
        "--concurrency", a.concurrency, "--seed", str(a.seed), "--label", "quire-serve",
        "--vocab-lo", str(ids[0]), "--vocab-hi", str(ids[1]),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not rows:
        sys.exit(f"loadgen failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    model = ensure_model(a.model, a.preset)
    ids = id_range(model)
    levels = [int(c) for c in a.concurrency.split(",")]
    print(
        f"workload: {a.num_requests} streaming requests x {a.input_len} prompt + {a.output_len} output tokens "
        f"at concurrency {a.concurrency}; cores={os.cpu_count()}",
        flush=True,
    )
    log_path = Path(tempfile.mkdtemp(prefix="quire-bench-")) / "server.log"
    proc, url = start_server(model, a.max_num_seqs, log_path)
    try:
        rows = run_loadgen(url, a, ids)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    print(f"server log: {log_path}", flush=True)

    # The same requests as the highest level's (loadgen seeds each level with seed + its index).
    loadgen = load_loadgen()
    top = len(levels) - 1
    prompts = loadgen.workload(a.num_requests, a.input_len, ids[0], ids[1], a.seed + top, 0)
    offline_s, offline_tokens = time_llm_generate(model, prompts, a.output_len, levels[top])
    offline_tps = offline_tokens / offline_s

    cols = ("concurrency", "ok", "output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")
    print()
    print(" | ".join(f"{c:>12}" for c in cols))
    for row in rows:
        print(" | ".join(f"{row[c]!s:>12}" for c in cols))
    print(
        f"\nLLM.generate offline, max_num_seqs={levels[top]}: {offline_tokens} tokens in {offline_s:.1f} s "
        f"= {offline_tps:.1f} output tok/s"
    )
    served = next(r for r in rows if r["concurrency"] == levels[top])
    print(
        f"server / offline throughput at concurrency {levels[top]}: {served['output_tok_s'] / offline_tps:.2f}"
    )
    return 1 if any(r["errors"] or r["out_len_mismatch"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
