"""Quantized-weight linear layers against the bf16 panel GEMM, on smollm2-135m's shapes.

    .venv/bin/python benchmarks/quant_gemm.py [--rows 1 32] [--types Q8_0 Q4_1 Q4_K] [--reps 7] [--threads N]
                                              [--gguf-layout] [--a8]

For each shape and row count, times ``quant_linear`` (weights in a GGUF block format) and
``packed_linear`` with bf16 panels over enough copies of the weight that they do not fit in the
CPU's caches (as in serving, where every step streams the whole model from memory). The two are
timed alternately, ``--reps`` times each, and the median of the per-pair time ratios is printed
(bf16 time / quantized time: above 1 means the quantized weight is faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quire.kernels.cpu_ops import cpu_ops  # noqa: E402
from quire.models.quant_linear import (  # noqa: E402
    INT8_ACTIVATIONS_FLAG,
    INTERLEAVED_FLAG,
    QUAD_RUN,
    QUANT_TYPES,
    QuantizedLinearWeight,
    interleave_rows,
)

# smollm2-135m's linear layers, [out_features, in_features].
SHAPES = {
    "qkv": (960, 576),
    "o": (576, 576),
    "gate_up": (3072, 576),
    "down": (576, 1536),
    "lm_head": (49152, 576),
}
# Copies of each weight cycled through per timing: at least this many bf16 bytes, past the caches.
STREAM_BYTES = 96 << 20


def random_raw(quant_type: str, out_features: int, in_features: int, gen: torch.Generator) -> torch.Tensor:
    """Valid blocks: random quant bytes with every f16 scale set to 0.01 (no inf/NaN/denormals)."""
    fmt = QUANT_TYPES[quant_type]
    blocks = torch.randint(
        0,
        256,
        (out_features * in_features // fmt.block_elems, fmt.block_bytes),
        dtype=torch.uint8,
        generator=gen,
    )
    scale = torch.tensor([0.01], dtype=torch.float16).view(torch.uint8)
    for offset in {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q6_K": (208,)}.get(quant_type, (0, 2)):
        blocks[:, offset : offset + 2] = scale
    return blocks.reshape(out_features, -1)


def seconds_per_call(fn, copies: list, x: torch.Tensor) -> float:
    start = time.perf_counter()
    for weight in copies:
        fn(x, weight)
    return (time.perf_counter() - start) / len(copies)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--types", nargs="+", default=["Q8_0", "Q4_1", "Q4_K"], choices=list(QUANT_TYPES))
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--gguf-layout",
        action="store_true",
        help="also time Q8_0/Q4_0/Q4_1 in GGUF's row layout (columns marked /gguf) besides the interleaved one",
    )
    parser.add_argument(
        "--a8",
        action="store_true",
        help="also time Q8_0/Q4_0/Q4_1 with int8 activations (--quantized-activations int8; columns marked /a8)",
    )
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    ops = cpu_ops()
    if ops is None:
        sys.exit("the compiled CPU kernels are unavailable")
    gen = torch.Generator().manual_seed(0)
    print(
        f"threads={torch.get_num_threads()}  ratio = bf16-panel time / quantized time (median of {args.reps})"
    )
    # (column label, quant type, layout): what QuantizedLinearWeight keeps ("interleaved" for Q8_0 /
    # Q4_0 / Q4_1, "gguf" rows for the K-quants), optionally GGUF's rows and the int8-activation path.
    columns = []
    for t in args.types:
        interleaved = QUANT_TYPES[t].interleave_head > 0
        columns.append((t, t, "interleaved" if interleaved else "gguf"))
        if interleaved and args.gguf_layout:
            columns.append((f"{t}/gguf", t, "gguf"))
        if interleaved and args.a8:
            columns.append((f"{t}/a8", t, "a8"))
    print(f"{'shape':>8} {'rows':>4} {'bf16 us':>9} " + " ".join(f"{c[0]:>14}" for c in columns))
    for name in args.shapes:
        out_features, in_features = SHAPES[name]
        n_copies = max(2, STREAM_BYTES // (out_features * in_features * 2))
        dense = torch.randn(out_features, in_features, generator=gen).bfloat16().float()
        panels = [ops.pack_weight_panels(dense, True) for _ in range(n_copies)]
        raws = {
            t: [random_raw(t, out_features, in_features, gen) for _ in range(n_copies)]
            for t in args.types
            if in_features % QUANT_TYPES[t].block_elems == 0
        }
        # The layout QuantizedLinearWeight keeps (interleaved for Q8_0 / Q4_0 / Q4_1).
        layouts: dict[str, dict[str, list[torch.Tensor]]] = {"gguf": raws, "interleaved": {}, "a8": {}}
        for t, copies in raws.items():
            if QUANT_TYPES[t].interleave_head > 0:
                layouts["interleaved"][t] = [
                    QuantizedLinearWeight(raw, t, in_features).packed for raw in copies
                ]
                if args.a8:
                    layouts["a8"][t] = [interleave_rows(raw, QUANT_TYPES[t], QUAD_RUN) for raw in copies]

        def bf16(x: torch.Tensor, p: torch.Tensor, n: int = out_features) -> torch.Tensor:
            return ops.packed_linear(x, p, n, None)

        for rows in args.rows:
            x = torch.randn(rows, in_features, generator=gen)
            cells = []
            base_times = []
            for _, quant_type, layout in columns:
                if quant_type not in raws:  # K-quants need in_features to be a multiple of 256
                    cells.append(f"{'n/a':>14}")
                    continue
                flag = {"gguf": 0, "interleaved": INTERLEAVED_FLAG, "a8": INT8_ACTIVATIONS_FLAG}[layout]
                type_id = QUANT_TYPES[quant_type].ggml_type + flag
                weights = layouts[layout][quant_type]

                def quant(
                    x: torch.Tensor, raw: torch.Tensor, t: int = type_id, k: int = in_features
                ) -> torch.Tensor:
                    return ops.quant_linear(x, raw, t, k, None)

                seconds_per_call(bf16, panels, x)  # warm up both
                seconds_per_call(quant, weights, x)
                ratios = []
                for _ in range(args.reps):
                    base = seconds_per_call(bf16, panels, x)
                    ratios.append(base / seconds_per_call(quant, weights, x))
                    base_times.append(base)
                cells.append(f"{statistics.median(ratios):>13.2f}x")
            print(
                f"{name:>8} {rows:>4} {statistics.median(base_times) * 1e6:>9.0f} " + " ".join(cells),
                flush=True,
            )


if __name__ == "__main__":
    main()
