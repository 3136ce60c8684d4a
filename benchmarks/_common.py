"""Pieces the benchmark scripts share: the checkpoint they run on, and a timed LLM.generate."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The load generator and checkpoint maker, carried in the repository (benchmarks/tools/).
TOOLS = Path(__file__).resolve().parent / "tools"
DEFAULT_MODEL = REPO / "bench-models" / "smollm2-135m"


def ensure_model(path: Path, preset: str) -> Path:
    """The checkpoint at ``path``, made with benchmarks/tools/make_model.py if it is not there yet."""
    if (path / "config.json").exists():
        return path
    make_model = TOOLS / "make_model.py"
    if not make_model.exists():
        sys.exit(f"no checkpoint at {path} and no {make_model} to make one: pass --model DIR")
    print(f"making a random {preset} checkpoint in {path} ...", flush=True)
    subprocess.run([sys.executable, str(make_model), str(path), "--preset", preset], check=True)
    return path


def time_llm_generate(
    model: Path, prompts: list[list[int]], output_len: int, max_num_seqs: int
) -> tuple[float, int]:
    """Seconds and output tokens for ``prompts`` through ``LLM.generate`` (fp32, greedy, EOS ignored).

    The warm-up uses shifted copies of the first prompts, so no measured prompt is already in the
    prefix cache when the clock starts."""
    from quire import LLM, SamplingParams

    llm = LLM(str(model), dtype="float32", max_num_seqs=max_num_seqs, show_progress=False)
    warm = [{"prompt_token_ids": [t + 1 for t in prompt]} for prompt in prompts[:4]]
    llm.generate(warm, SamplingParams(max_tokens=4, ignore_eos=True))
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(r.outputs[0].token_ids) for r in results)


# A realistic extraction schema: nested object, array, enum, patterns, bounded and free strings.
EXTRACTION_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z0-9._]+@[a-z0-9]+\\.[a-z]{2,4}$"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 40},
                "city": {"type": "string", "maxLength": 30},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "role", "tags", "address", "active"],
    "additionalProperties": False,
}
