"""Shared fixtures: tiny random checkpoints of every supported architecture variant.

Checkpoints are built once per session (each takes a fraction of a second) under pytest's
session temp directory. A test that takes a ``tiny_variant`` argument runs once per variant.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from quire.models.demo import build_random_checkpoint

_LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Tiny, so that the scaled and blended bands cover most rotary frequencies of a 16-dim head.
    "original_max_position_embeddings": 32,
}

# Variant name -> build_random_checkpoint arguments. Together they cover every config flag the
# model reads: GQA, tied/untied embeddings, q/k/v/o biases (Llama flag and Qwen2's fixed q/k/v
# bias), Qwen3 q/k norm with head_dim != hidden/heads, default/linear/llama3 RoPE in both the
# transformers-4 and -5 spellings, Mistral's recorded sliding window, a sharded checkpoint, and
# weights stored in bf16.
TINY_MODEL_VARIANTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "llama-llama3": {"rope_scaling": _LLAMA3_SCALING, "rope_format": "rope_parameters"},
    "llama-linear": {"rope_scaling": {"type": "linear", "factor": 2.0}},
    "llama-untied-bias": {"tie_word_embeddings": False, "attention_bias": True},
    "llama-sharded": {"sharded": True},  # same weights as "llama"
    "mistral": {"tie_word_embeddings": False, "num_kv_heads": 1},
    "qwen2": {"rope_theta": 1000000.0},
    "qwen3": {"head_dim": 32},
    # Stored in bf16 (computed in fp32): the CPU fast path's bf16-weight kernel takes these.
    "qwen2-bf16": {"dtype": "bfloat16", "tie_word_embeddings": False},
}


def pytest_configure(config: pytest.Config) -> None:
    # Tests that start quire without a model (servers, CLI runs) get the tiny random demo
    # checkpoint whatever is installed; those about the real default model set this back to auto.
    os.environ["QUIRE_DEFAULT_MODEL"] = "demo"


def pytest_sessionstart(session: pytest.Session) -> None:
    # Build (or load from torch's cache) the compiled CPU kernels once, up front: the first build
    # takes about a minute, which would otherwise land inside whichever test, or server
    # subprocess waiting to become healthy, happened to load a model first.
    from quire.kernels.cpu_ops import cpu_ops

    cpu_ops()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "tiny_variant" in metafunc.fixturenames:
        metafunc.parametrize("tiny_variant", list(TINY_MODEL_VARIANTS))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_model_dir("qwen3")`` -> path of that variant's checkpoint (built on first request)."""
    built: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in TINY_MODEL_VARIANTS:
            raise ValueError(
                f"unknown tiny model variant {variant!r}; known: {', '.join(TINY_MODEL_VARIANTS)}"
            )
        if variant not in built:
            arch = variant.split("-", 1)[0]
            out = tmp_path_factory.mktemp(f"tiny-{variant}")
            built[variant] = build_random_checkpoint(out, arch, **TINY_MODEL_VARIANTS[variant])
        return built[variant]

    return get


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dir: Callable[[str], Path]) -> Path:
    """The plain tiny Llama checkpoint (tied embeddings, GQA 4/2, vocab 512)."""
    return tiny_model_dir("llama")
