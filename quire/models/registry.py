"""Architecture registry: maps the ``architectures`` names of a Hugging Face config to model classes.

Model modules register themselves with ``@register_model(...)`` when imported; ``resolve_model_class``
imports the built-in model modules first, so callers never need to know which module holds which
architecture (DESIGN.md principle 5: registries, not if/elif chains).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TypeVar

import torch.nn as nn

ModelT = TypeVar("ModelT", bound=type[nn.Module])

# Modules whose import registers the built-in architectures. Imported lazily so that importing the
# registry (e.g. from the config parser) does not build any model code.
_BUILTIN_MODEL_MODULES = ("quire.models.llama",)


class _ModelRegistry:
    """Architecture name -> model class. Written only by ``register_model`` at import time."""

    def __init__(self) -> None:
        self._classes: dict[str, type[nn.Module]] = {}

    def add(self, architecture: str, cls: type[nn.Module]) -> None:
        existing = self._classes.get(architecture)
        if existing is not None and existing is not cls:
            raise ValueError(
                f"architecture {architecture!r} is already registered to {existing.__qualname__}; "
                f"cannot register {cls.__qualname__} for it too"
            )
        self._classes[architecture] = cls

    def get(self, architecture: str) -> type[nn.Module] | None:
        return self._classes.get(architecture)

    def names(self) -> list[str]:
        return sorted(self._classes)


# The one process-wide registry. It is append-only and filled by decorators during module import,
# which is the point of a registry; nothing mutates it at request time.
_REGISTRY = _ModelRegistry()


def register_model(*architectures: str) -> Callable[[ModelT], ModelT]:
    """Class decorator: ``@register_model("LlamaForCausalLM", "MistralForCausalLM")``."""
    if not architectures:
        raise ValueError("register_model needs at least one architecture name")

    def decorator(cls: ModelT) -> ModelT:
        for name in architectures:
            _REGISTRY.add(name, cls)
        return cls

    return decorator


def _import_builtin_models() -> None:
    for module in _BUILTIN_MODEL_MODULES:
        importlib.import_module(module)


def supported_architectures() -> list[str]:
    """Every architecture name quire can load, sorted."""
    _import_builtin_models()
    return _REGISTRY.names()


def resolve_model_class(architectures: list[str]) -> type[nn.Module]:
    """The model class for the first supported name in a config's ``architectures`` list."""
    _import_builtin_models()
    if not architectures:
        raise ValueError(
            "the model config lists no 'architectures'; set it to one of: " + ", ".join(_REGISTRY.names())
        )
    for name in architectures:
        cls = _REGISTRY.get(name)
        if cls is not None:
            return cls
    raise ValueError(
        f"unsupported model architecture {', '.join(map(repr, architectures))}; "
        f"quire supports: {', '.join(_REGISTRY.names())}"
    )
