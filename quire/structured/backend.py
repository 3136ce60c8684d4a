"""The grammar engine behind constrained decoding: one small interface and a registry by name.

A backend turns a ``StructuredOutputsParams`` into a compiled grammar, makes one matcher per
sequence from it, fills a whole batch's token bitmasks in one call, and advances a matcher by
the tokens a sequence produces. Only ``validate`` works without a tokenizer: the API process
calls it to refuse a bad schema, regex or grammar before the request is admitted.

Bitmasks share one layout across backends (llguidance's and xgrammar's): an int32 tensor of
``[rows, ceil(vocab / 32)]`` where bit ``j`` of word ``w`` allows token ``32 * w + j``.

A second backend is one new module implementing ``GrammarBackend`` plus one line in
``_BACKENDS``. Modules are imported when first asked for, so the API process never loads the
engine-side dependencies of a backend it only validates with.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from quire.structured.params import StructuredOutputsParams

if TYPE_CHECKING:
    import torch

    from quire.tokenizer import Tokenizer

DEFAULT_BACKEND = "llguidance"

# name -> "module:attribute" of a GrammarBackend class, imported on first use.
_BACKENDS: dict[str, str] = {
    "llguidance": "quire.structured.llguidance_backend:LLGuidanceBackend",
}


class GrammarMatcher(Protocol):
    """Where one sequence stands in its grammar."""

    def allows(self, token_id: int) -> bool:
        """Whether ``token_id`` may come next, without advancing. End-of-sequence is allowed
        only where the grammar is complete."""
        ...

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False (and the matcher is then unusable) if the grammar
        does not allow it."""
        ...

    def accept_many(self, token_ids: Sequence[int]) -> bool:
        """Advance by several tokens (replaying a resumed sequence); False if any is refused."""
        ...

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens (for proposers that guess ahead)."""
        ...

    def error(self) -> str:
        """Why the matcher refused a token; empty while it has not."""
        ...


class GrammarBackend(Protocol):
    """A grammar engine. ``validate`` is a classmethod (no tokenizer needed); the rest is bound
    to one model's tokenizer, built once per engine with ``create``."""

    @classmethod
    def validate(cls, params: StructuredOutputsParams) -> None:
        """Raise ``ValueError`` with the engine's own message if the constraint does not compile."""
        ...

    @classmethod
    def create(cls, tokenizer: Tokenizer, vocab_size: int) -> GrammarBackend:
        """The backend for a model: ``vocab_size`` is the model's (logit) vocabulary, and every
        end-of-sequence id of ``tokenizer`` ends a grammar."""
        ...

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled grammar (opaque; cache it by ``params.cache_key``). ``ValueError`` if
        it does not compile."""
        ...

    def new_matcher(self, compiled: Any) -> GrammarMatcher:
        """A matcher at the start of ``compiled``."""
        ...

    def allocate_bitmask(self, num_rows: int) -> torch.Tensor:
        """A CPU int32 bitmask of ``[num_rows, ceil(vocab / 32)]``."""
        ...

    def fill_bitmask(self, matchers: Sequence[GrammarMatcher], bitmask: torch.Tensor) -> None:
        """Fill row ``i`` of ``bitmask`` with the tokens ``matchers[i]`` allows next, for the whole
        batch in one call. Must release the GIL while it works: it runs beside the forward."""
        ...


def backend_names() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def get_backend_class(name: str = DEFAULT_BACKEND) -> type[GrammarBackend]:
    """The backend class registered under ``name``."""
    spec = _BACKENDS.get(name)
    if spec is None:
        raise ValueError(f"unknown structured output backend {name!r}; available: {', '.join(_BACKENDS)}")
    module_name, attribute = spec.split(":")
    return getattr(importlib.import_module(module_name), attribute)


def constraint_digest(params: StructuredOutputsParams) -> bytes:
    """A short key for ``params.cache_key``: a constraint may be 256 KB of text, and caches keyed
    by it should hold a few bytes per entry, not the text."""
    return hashlib.sha256(json.dumps(params.cache_key).encode()).digest()


def validate_structured_outputs(
    params: StructuredOutputsParams, backend: str = DEFAULT_BACKEND, cache: LRUCache | None = None
) -> None:
    """Raise ``ValueError`` with the grammar engine's message if ``params`` cannot compile.

    ``cache`` (owned by the caller) remembers the verdict per constraint: tool-calling clients
    send the same schema with every request."""
    key = (backend, constraint_digest(params))
    message = cache.get(key) if cache is not None else None
    if message is None:
        try:
            get_backend_class(backend).validate(params)
            message = ""
        except ValueError as exc:
            message = str(exc) or "the structured output constraint does not compile"
        if cache is not None:
            cache.put(key, message)
    if message:
        raise ValueError(message)


class LRUCache:
    """A bounded mapping that forgets the least recently used entry first. Thread-safe: the API
    process validates on the event loop and in the worker threads that prepare long prompts."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Any) -> Any | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def get_or_make(self, key: Any, make: Callable[[], Any]) -> Any:
        value = self.get(key)
        if value is None:
            value = make()
            self.put(key, value)
        return value
