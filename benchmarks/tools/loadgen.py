#!/usr/bin/env python3
"""Load generator for any OpenAI-compatible completions server.

One of quire's own benchmark tools (benchmarks/tools/), kept in the repository so that
benchmarks/serve_throughput.py runs from a fresh clone; it imports nothing from quire, so it
measures quire and its peers alike.

Sends a seeded, fixed workload of streaming /v1/completions requests whose
prompts are lists of token ids (exact input lengths on every server), asks for
exactly --output-len tokens (ignore_eos), and reports throughput and latency
percentiles per concurrency level. The same workload against two servers is a
side-by-side comparison.

Each concurrency level (and each warm-up) gets its own seeded prompts, so a
server with a prefix/prompt cache never sees a prompt it has already processed
(only --shared-prefix is meant to be shared, within a level). Every request uses
a fresh connection (llama-server closes the connection after a streamed
response while advertising keep-alive).

    python loadgen.py --base-url http://127.0.0.1:8000 --model NAME \
        --input-len 128 --output-len 128 --num-requests 64 --concurrency 1,8,32

Prints one JSON object a line (one per concurrency level), then a table.
Needs: aiohttp.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def workload(n, input_len, vocab_lo, vocab_hi, seed, shared_prefix):
    rng = random.Random(seed)
    prefix = [rng.randrange(vocab_lo, vocab_hi) for _ in range(shared_prefix)]
    return [
        prefix + [rng.randrange(vocab_lo, vocab_hi) for _ in range(input_len - shared_prefix)]
        for _ in range(n)
    ]


async def one(session, url, headers, body, timeout):
    import aiohttp

    t0 = time.perf_counter()
    stamps, usage, err = [], None, None
    try:
        async with session.post(
            url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as r:
            if r.status != 200:
                return {"error": f"HTTP {r.status}: {(await r.text())[:200]}"}
            buf = b""
            async for chunk in r.content.iter_any():
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        continue
                    obj = json.loads(data)
                    if obj.get("usage"):
                        usage = obj["usage"]
                    # a chunk with choices is a step of output, even when its text is empty
                    # (a token that ends mid-character); token counts come from usage
                    # ... but not the closing chunk (no text, finish_reason set), which
                    # llama-server sends after the last token
                    if any(c.get("text") or c.get("finish_reason") is None for c in obj.get("choices") or []):
                        stamps.append(time.perf_counter())
    except Exception as e:  # noqa: BLE001 - a load generator records every failure
        err = f"{type(e).__name__}: {e}"
    t1 = time.perf_counter()
    if err:
        return {"error": err}
    n_out = usage["completion_tokens"] if usage and usage.get("completion_tokens") else len(stamps)
    cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    ttft = (stamps[0] - t0) if stamps else t1 - t0
    itl = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    tpot = (t1 - t0 - ttft) / (n_out - 1) if n_out > 1 else 0.0
    return {
        "ttft": ttft,
        "e2e": t1 - t0,
        "n_out": n_out,
        "itl": itl,
        "tpot": tpot,
        "chunks": len(stamps),
        "cached": cached,
    }


async def run_level(args, prompts, warmup_prompts, concurrency):
    import aiohttp

    url = args.base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    sem = asyncio.Semaphore(concurrency)
    # force_close: a new connection per request. llama-server closes the connection after a
    # streamed response while advertising keep-alive, so a pooled connection fails the next
    # request (ServerDisconnectedError / "Can not write request body"). Loopback connects
    # cost well under a millisecond, the same for every server.
    conn = aiohttp.TCPConnector(limit=0, force_close=True)

    async with aiohttp.ClientSession(connector=conn) as session:

        async def bounded(p):
            body = {
                "model": args.model,
                "prompt": p,
                "max_tokens": args.output_len,
                "temperature": args.temperature,
                "stream": True,
                "stream_options": {"include_usage": True},
                "ignore_eos": True,
            }
            body.update(args.extra)
            async with sem:
                return await one(session, url, headers, body, args.timeout)

        if args.warmup:
            await asyncio.gather(*[bounded(p) for p in warmup_prompts])
        t0 = time.perf_counter()
        res = await asyncio.gather(*[bounded(p) for p in prompts])
        wall = time.perf_counter() - t0

    ok = [r for r in res if "error" not in r]
    errs = [r["error"] for r in res if "error" in r]
    out_tokens = sum(r["n_out"] for r in ok)
    itl = [x for r in ok for x in r["itl"]]
    ms = lambda x: round(1000 * x, 1)  # noqa: E731
    return {
        "concurrency": concurrency,
        "requests": len(prompts),
        "ok": len(ok),
        "errors": len(errs),
        "first_error": errs[0] if errs else None,
        "wall_s": round(wall, 2),
        "output_tok_s": round(out_tokens / wall, 1),
        "total_tok_s": round((out_tokens + args.input_len * len(ok)) / wall, 1),
        "req_s": round(len(ok) / wall, 2),
        "mean_out_tokens": round(out_tokens / max(1, len(ok)), 1),
        "out_len_mismatch": sum(1 for r in ok if r["n_out"] != args.output_len),
        "cached_prompt_tokens": sum(r["cached"] for r in ok),
        "ttft_p50_ms": ms(pct([r["ttft"] for r in ok], 50)),
        "ttft_p99_ms": ms(pct([r["ttft"] for r in ok], 99)),
        "tpot_p50_ms": ms(pct([r["tpot"] for r in ok], 50)),
        "tpot_p99_ms": ms(pct([r["tpot"] for r in ok], 99)),
        "itl_p50_ms": ms(pct(itl, 50)),
        "itl_p99_ms": ms(pct(itl, 99)),
        "e2e_p50_s": round(pct([r["e2e"] for r in ok], 50), 2),
        "e2e_p99_s": round(pct([r["e2e"] for r in ok], 99), 2),
        "mean_itl_ms": ms(statistics.mean(itl)) if itl else None,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", required=True)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--shared-prefix", type=int, default=0, help="leading tokens common to every prompt")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    ap.add_argument("--vocab-lo", type=int, default=1000, help="prompt token ids are drawn from [lo, hi)")
    ap.add_argument("--vocab-hi", type=int, default=20000)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--no-warmup", dest="warmup", action="store_false")
    ap.add_argument("--extra", type=json.loads, default={}, help="JSON merged into every request body")
    ap.add_argument("--label", default="", help="name printed with each result")
    args = ap.parse_args()

    rows = []
    for i, c in enumerate(int(x) for x in args.concurrency.split(",")):
        # fresh prompts for every level and for its warm-up: re-sent prompts would be
        # prefix-cache hits on servers that cache (llama-server does by default)
        prompts = workload(
            args.num_requests, args.input_len, args.vocab_lo, args.vocab_hi, args.seed + i, args.shared_prefix
        )
        warm = workload(
            min(args.num_requests, c, 4),
            args.input_len,
            args.vocab_lo,
            args.vocab_hi,
            args.seed + 1_000_003 + i,
            args.shared_prefix,
        )
        r = asyncio.run(run_level(args, prompts, warm, c))
        r["label"] = args.label
        rows.append(r)
        print(json.dumps(r), flush=True)
    cols = [
        "concurrency",
        "ok",
        "errors",
        "output_tok_s",
        "ttft_p50_ms",
        "ttft_p99_ms",
        "tpot_p50_ms",
        "tpot_p99_ms",
        "e2e_p99_s",
    ]
    print(" ".join(f"{c:>13}" for c in cols), file=sys.stderr)
    for r in rows:
        print(" ".join(f"{str(r[c]):>13}" for c in cols), file=sys.stderr)
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
