"""Assemble an engine core (model, KV cache, scheduler) from user-facing EngineArgs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from quire.config import EngineArgs
from quire.core.engine_core import EngineCore
from quire.core.kv_manager import KVCacheManager

if TYPE_CHECKING:
    from quire.tokenizer import Tokenizer


def resolve_model_path(args: EngineArgs) -> str:
    """The model directory or .gguf file to load; the default model (quire.models.default_model)
    when none is given."""
    if args.model is not None:
        return args.model
    from quire.models.default_model import default_model

    return str(default_model().path)


@dataclass(frozen=True)
class EngineInfo:
    """What clients need to know about the engine behind them."""

    model_path: str
    max_model_len: int
    vocab_size: int
    num_blocks: int
    block_size: int
    dtype: str  # the compute dtype
    device: str
    kv_cache_dtype: str  # what the KV cache stores (--kv-cache-dtype; the compute dtype by default)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size


def check_tokenizer_fits_model(model_path: str) -> tuple[Tokenizer, int]:
    """The model's tokenizer and vocabulary size; refuses a model whose tokenizer can produce ids
    past the model's vocabulary.

    Runs before the weights load, so a mismatch costs a second, not a model load, and is never
    found later by the first prompt that happens to produce such an id (which would fail the
    request, or on some devices read outside the embedding table)."""
    from quire.frontend.input_processor import check_vocab_fits
    from quire.models.loader import read_arch_config  # a directory or a .gguf file
    from quire.tokenizer import Tokenizer

    tokenizer, vocab_size = Tokenizer.from_path(model_path), read_arch_config(model_path).vocab_size
    check_vocab_fits(tokenizer, vocab_size)
    return tokenizer, vocab_size


def build_engine_core(args: EngineArgs, model_path: str) -> tuple[EngineCore, EngineInfo]:
    # Imported here, not at module level: the worker and the dtype policy pull in torch.
    from quire.models.dtype_policy import dtype_name
    from quire.structured.manager import StructuredOutputManager
    from quire.worker.worker import build_worker

    tokenizer, vocab_size = check_tokenizer_fits_model(model_path)
    cache = args.cache_config()
    # The grammar engine's view of the tokenizer takes a few hundred ms to build: it is built on
    # a background thread while the model loads, and waited on by the first constrained request.
    structured = StructuredOutputManager.for_tokenizer(tokenizer, vocab_size)
    worker = build_worker(
        args.model_config(model_path), cache, show_progress=args.show_progress, structured=structured
    )
    kv = KVCacheManager(worker.num_blocks, cache.block_size, cache.enable_prefix_caching)
    core = EngineCore(args.scheduler_config(worker.max_model_len), kv, worker.runner)
    info = EngineInfo(
        model_path=model_path,
        max_model_len=worker.max_model_len,
        vocab_size=worker.vocab_size,
        num_blocks=worker.num_blocks,
        block_size=cache.block_size,
        dtype=dtype_name(worker.dtype),
        device=str(worker.device),
        kv_cache_dtype=dtype_name(worker.kv_cache_dtype),
    )
    return core, info
