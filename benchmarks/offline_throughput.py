#!/usr/bin/env python3
"""Offline throughput: quire's ``LLM.generate`` against ``transformers`` ``generate()`` one at a time.

Both run in this one command on the same checkpoint, the same random token-id prompts, the same
output length (EOS ignored) and fp32 compute, and the ratio of their output-token throughputs is
printed. Machines here are noisy: compare the two numbers from one run, not across runs.

    python benchmarks/offline_throughput.py                 # makes a smollm2-135m-shape checkpoint
    python benchmarks/offline_throughput.py --model DIR --num-requests 64 --input-len 128 --output-len 128
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

from _common import DEFAULT_MODEL, ensure_model, time_llm_generate


def make_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Skip the low ids (special tokens live there in these tokenizers).
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(num)]


def run_transformers(model: Path, prompts: list[list[int]], output_len: int) -> tuple[float, int]:
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    hf.eval()

    def one(prompt: list[int], new_tokens: int) -> int:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        return out.shape[1] - ids.shape[1]

    one(prompts[0], 4)  # warm-up
    start = time.perf_counter()
    tokens = sum(one(p, output_len) for p in prompts)
    return time.perf_counter() - start, tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument(
        "--baseline-requests",
        type=int,
        default=None,
        help="run only the first N requests through transformers (serial throughput is a rate; "
        "the full 64 take ~20 min on 2 cores)",
    )
    a = ap.parse_args()

    model = ensure_model(a.model, a.preset)
    import json

    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    prompts = make_prompts(a.num_requests, a.input_len, min(vocab, 32000), a.seed)
    print(
        f"workload: {a.num_requests} requests x {a.input_len} prompt + {a.output_len} output tokens, "
        f"torch threads={__import__('torch').get_num_threads()}, cores={os.cpu_count()}",
        flush=True,
    )

    q_time, q_tokens = time_llm_generate(model, prompts, a.output_len, a.max_num_seqs)
    q_tps = q_tokens / q_time
    print(
        f"quire LLM.generate:            {q_tokens} tokens in {q_time:7.1f} s = {q_tps:8.1f} output tok/s",
        flush=True,
    )
    if a.skip_transformers:
        return 0
    h_time, h_tokens = run_transformers(model, prompts[: a.baseline_requests], a.output_len)
    h_tps = h_tokens / h_time
    print(f"transformers generate, serial: {h_tokens} tokens in {h_time:7.1f} s = {h_tps:8.1f} output tok/s")
    print(f"ratio quire / transformers: {q_tps / h_tps:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
