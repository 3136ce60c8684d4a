"""The benchmark workload: seeded random token-id prompts and Poisson arrival times.

Prompts are token ids, not text, so every server sees exactly ``input_len`` prompt tokens whatever
its tokenizer. Each (level, purpose) pair draws from its own seed stream, so a server with a prefix
cache never sees a prompt it processed at an earlier level or during warm-up; only the optional
shared prefix repeats, and only within one level.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

# Seed-stream tags, so warm-up prompts and measured prompts of one level never coincide.
MEASURED = 0
WARMUP = 1
ARRIVALS = 2


@dataclass(frozen=True)
class WorkloadConfig:
    input_len: int = 128
    output_len: int = 128
    num_requests: int = 64
    # Token ids are drawn from [vocab_lo, vocab_hi): clear of the low ids where most vocabularies
    # keep special tokens, and under the size of any vocabulary a benchmark is likely to meet.
    vocab_lo: int = 100
    vocab_hi: int = 30000
    seed: int = 0
    shared_prefix_len: int = 0

    def __post_init__(self) -> None:
        if self.input_len < 1:
            raise ValueError(f"input_len must be >= 1, got {self.input_len}")
        if self.output_len < 1:
            raise ValueError(f"output_len must be >= 1, got {self.output_len}")
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if not 0 <= self.vocab_lo < self.vocab_hi:
            raise ValueError(
                f"need 0 <= vocab_lo < vocab_hi, got [{self.vocab_lo}, {self.vocab_hi}); "
                "pick a range inside the model's vocabulary"
            )
        if not 0 <= self.shared_prefix_len <= self.input_len:
            raise ValueError(
                f"shared_prefix_len must be in [0, input_len={self.input_len}], got {self.shared_prefix_len}"
            )


def fit_to_vocab(config: WorkloadConfig, vocab_size: int) -> WorkloadConfig:
    """``config`` with its token-id range cut to ``[lo, vocab_size)`` where it reaches past the
    vocabulary: the default range suits real vocabularies, a small model (the demo) gets its own."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    if config.vocab_hi <= vocab_size:
        return config
    return replace(config, vocab_hi=vocab_size, vocab_lo=min(config.vocab_lo, vocab_size // 2))


def _rng(config: WorkloadConfig, level: int, purpose: int) -> np.random.Generator:
    # SeedSequence mixes the whole tuple, so neighbouring seeds or levels give unrelated streams.
    return np.random.default_rng([config.seed, level, purpose])


def make_prompts(
    config: WorkloadConfig, level: int, count: int | None = None, purpose: int = MEASURED
) -> list[list[int]]:
    """``count`` (default ``num_requests``) prompts of ``input_len`` token ids for level ``level``."""
    n = config.num_requests if count is None else count
    if n < 0:
        raise ValueError(f"prompt count must be >= 0, got {n}")
    rng = _rng(config, level, purpose)
    prefix = rng.integers(config.vocab_lo, config.vocab_hi, size=config.shared_prefix_len).tolist()
    tail_len = config.input_len - config.shared_prefix_len
    tails = rng.integers(config.vocab_lo, config.vocab_hi, size=(n, tail_len)).tolist()
    return [prefix + tail for tail in tails]


def arrival_offsets(config: WorkloadConfig, level: int, request_rate: float, count: int) -> list[float]:
    """Seconds after the start at which each request is sent: a Poisson process of ``request_rate``
    requests/s (exponential gaps), the first request at 0."""
    if request_rate <= 0:
        raise ValueError(f"request_rate must be > 0, got {request_rate}")
    if count <= 0:
        return []
    gaps = _rng(config, level, ARRIVALS).exponential(1.0 / request_rate, size=count - 1)
    return [0.0, *np.cumsum(gaps).tolist()]
