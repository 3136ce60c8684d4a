"""quire: an LLM inference server with a paged KV cache and continuous batching."""

from __future__ import annotations

from quire.sampling import CompletionOutput, RequestOutput, SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import quire` (and the torch-free core) does not pull in torch.
    if name == "LLM":
        from quire.entrypoints.llm import LLM

        return LLM
    raise AttributeError(f"module 'quire' has no attribute {name!r}")
