"""The model runner's structured-output hook: one grammar matcher per constrained sequence.

The runner calls it at named points of a step:

- ``add_request`` / ``remove_request`` as sequences arrive (or come back after preemption, with
  the tokens they already produced, which are replayed) and leave;
- ``raise_failures`` once the plan is applied, before the forward: a sequence whose grammar
  could not be compiled, or whose matcher refused a token, fails with ``RequestExecutionError``
  and every other request goes on;
- ``start_bitmask`` before the forward: the bitmasks of the rows about to be sampled are filled,
  for the whole batch in one backend call, on a background thread; the backend works with the
  GIL released, so this overlaps the model's forward;
- ``finish_bitmask`` before sampling: waits for that fill and hands the sampler the masks;
- ``accept_tokens`` after sampling: each constrained sequence's matcher takes its new token.

The backend (its tokenizer takes a few hundred ms to build) is built on a background thread when
the engine starts and waited on only when the first constrained request arrives. Steps with no
constrained sequence never touch it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from quire.core.outputs import RequestExecutionError
from quire.structured.backend import (
    DEFAULT_BACKEND,
    GrammarBackend,
    GrammarMatcher,
    LRUCache,
    constraint_digest,
    get_backend_class,
)
from quire.structured.bitmask import TokenBitmask
from quire.structured.params import StructuredOutputsParams

if TYPE_CHECKING:
    from quire.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Compiled grammars kept for reuse. A compiled grammar can take tens of MB (measured: ~26 MB for a
# 150 KB pattern-heavy schema), so the cache is small and constraints above CACHEABLE_SPEC_CHARS
# are compiled per request and never kept: clients resend the same few schemas, and a client
# rotating huge ones must not make the engine hold gigabytes.
DEFAULT_CACHE_SIZE = 64
CACHEABLE_SPEC_CHARS = 16 * 1024


@dataclass
class BitmaskStats:
    """Cumulative mask-fill timings: how much of the fill the forward hid. ``wait_seconds`` is
    the time the engine thread spent waiting for fills after its forward; the rest of
    ``fill_seconds`` ran in parallel with the forward."""

    fills: int = 0
    fill_seconds: float = 0.0
    wait_seconds: float = 0.0

    @property
    def hidden_fraction(self) -> float:
        return 1.0 - self.wait_seconds / self.fill_seconds if self.fill_seconds > 0 else 1.0


@dataclass
class _Pending:
    """A bitmask fill running beside the forward."""

    rows: list[int]
    request_ids: list[str]
    matchers: list[GrammarMatcher]
    future: Future[None]
    bitmask: torch.Tensor


class StructuredOutputManager:
    """Grammar matchers of the runner's constrained sequences. Used from the engine thread only
    (the fill it starts runs on its own thread, and every other call waits for it first)."""

    def __init__(
        self, backend: Future[GrammarBackend] | GrammarBackend, cache_size: int = DEFAULT_CACHE_SIZE
    ) -> None:
        self._backend_source = backend
        self._compiled = LRUCache(cache_size)
        self._matchers: dict[str, GrammarMatcher] = {}
        self._failures: dict[str, str] = {}  # request id -> why it must fail
        self._fill_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quire-grammar")
        self._pending: _Pending | None = None
        self._bitmask: torch.Tensor | None = None  # reused across steps, grown as needed
        self.stats = BitmaskStats()

    @classmethod
    def start(
        cls,
        make_backend: Callable[[], GrammarBackend],
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> StructuredOutputManager:
        """A manager whose backend ``make_backend`` builds on a background thread, now."""
        builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quire-grammar-init")
        future = builder.submit(make_backend)
        future.add_done_callback(_log_build_failure)
        builder.shutdown(wait=False)
        return cls(future, cache_size)

    @classmethod
    def for_tokenizer(
        cls, tokenizer: Tokenizer, vocab_size: int, backend: str = DEFAULT_BACKEND
    ) -> StructuredOutputManager:
        """The manager for a model with this tokenizer; the backend's view of it is built in the
        background."""
        backend_class = get_backend_class(backend)
        return cls.start(lambda: backend_class.create(tokenizer, vocab_size))

    @property
    def backend(self) -> GrammarBackend:
        """The backend, waiting for its construction if it is still under way."""
        if isinstance(self._backend_source, Future):
            self._backend_source = self._backend_source.result()
        return self._backend_source

    @property
    def num_requests(self) -> int:
        return len(self._matchers)

    @property
    def cache(self) -> LRUCache:
        return self._compiled

    # ---- sequences arrive and leave ----

    def add_request(
        self, request_id: str, params: StructuredOutputsParams | None, output_token_ids: Sequence[int]
    ) -> None:
        """Track a sequence (replacing any earlier state for its id). A resumed sequence's
        ``output_token_ids`` are replayed. Failures are recorded for ``raise_failures``."""
        self._settle()
        self.remove_request(request_id)
        if params is None:
            return
        try:
            backend = self.backend
        except Exception as exc:  # e.g. a tokenizer the grammar engine cannot read: fail the request
            logger.error("structured output backend unavailable: %s", exc)
            self._failures[request_id] = f"structured output is unavailable for this model: {exc}"
            return
        try:
            compiled = self._compiled_grammar(backend, params)
            matcher = backend.new_matcher(compiled)
        except ValueError as exc:
            # The API process validated this constraint; only a tokenizer-dependent problem gets here.
            self._failures[request_id] = f"the structured output constraint does not compile: {exc}"
            return
        if not matcher.accept_many(output_token_ids):
            self._failures[request_id] = "the tokens generated before preemption do not match the grammar"
            return
        self._matchers[request_id] = matcher

    def _compiled_grammar(self, backend: GrammarBackend, params: StructuredOutputsParams) -> Any:
        if len(params.spec_text) > CACHEABLE_SPEC_CHARS:
            return backend.compile(params)
        return self._compiled.get_or_make(constraint_digest(params), lambda: backend.compile(params))

    def remove_request(self, request_id: str) -> None:
        self._settle()
        self._matchers.pop(request_id, None)
        self._failures.pop(request_id, None)

    def raise_failures(self, scheduled: Sequence[str] | dict[str, int]) -> None:
        """Raise ``RequestExecutionError`` naming the scheduled sequences that must fail."""
        if not self._failures:
            return
        culprits = {rid for rid in scheduled if rid in self._failures}
        if culprits:
            reasons = sorted({self._failures[rid] for rid in culprits})
            raise RequestExecutionError(
                f"structured output failed for {len(culprits)} request(s): {'; '.join(reasons)}", culprits
            )

    # ---- one step ----

    def start_bitmask(self, sample_ids: Sequence[str]) -> None:
        """Start filling the bitmasks of the constrained rows among ``sample_ids`` (the batch's
        rows to sample, in order) on the background thread. Nothing if no row is constrained."""
        self._settle()
        if not self._matchers:
            return
        rows = [i for i, rid in enumerate(sample_ids) if rid in self._matchers]
        if not rows:
            return
        backend = self.backend
        if self._bitmask is None or self._bitmask.shape[0] < len(rows):
            self._bitmask = backend.allocate_bitmask(max(len(rows), 2 * len(self._matchers)))
        bitmask = self._bitmask[: len(rows)]
        matchers = [self._matchers[sample_ids[i]] for i in rows]
        future = self._fill_thread.submit(self._timed_fill, backend, matchers, bitmask)
        self._pending = _Pending(rows, [sample_ids[i] for i in rows], matchers, future, bitmask)

    def finish_bitmask(self) -> TokenBitmask | None:
        """The masks started by ``start_bitmask`` (waiting for them), or None when no row is
        constrained this step.

        A matcher that broke while computing its mask (a grammar past the engine's parser limits)
        would allow only end-of-sequence, ending the output unfinished: its request fails with
        ``RequestExecutionError`` instead, raised before anything of the step is recorded, so the
        other requests simply run the step again."""
        pending = self._pending
        if pending is None:
            return None
        self._pending = None
        start = time.perf_counter()
        pending.future.result()
        self.stats.wait_seconds += time.perf_counter() - start
        broken = {
            rid: m.error() for rid, m in zip(pending.request_ids, pending.matchers, strict=True) if m.error()
        }
        if broken:
            self._fail(broken, "the grammar exceeded the engine's parser limits")
        return TokenBitmask(pending.rows, pending.bitmask)

    def _timed_fill(
        self, backend: GrammarBackend, matchers: list[GrammarMatcher], bitmask: torch.Tensor
    ) -> None:
        start = time.perf_counter()
        backend.fill_bitmask(matchers, bitmask)
        # Read by the engine thread only after this future completes: no lock needed.
        self.stats.fills += 1
        self.stats.fill_seconds += time.perf_counter() - start

    def accept_tokens(self, sample_ids: Sequence[str], token_ids: Sequence[int]) -> None:
        """Advance each constrained sequence by its sampled token. Called before the runner
        records the step: every token is checked first, and if a grammar refuses one (the mask
        was not applied: a bug) that request fails with ``RequestExecutionError`` while no matcher
        has moved, so the others run the step again unharmed. Never takes the engine down."""
        self._settle()
        if not self._matchers:
            return
        rows = [
            (request_id, matcher, token_id)
            for request_id, token_id in zip(sample_ids, token_ids, strict=True)
            if (matcher := self._matchers.get(request_id)) is not None
        ]
        refused = {request_id: "" for request_id, matcher, token_id in rows if not matcher.allows(token_id)}
        if refused:
            logger.error(
                "structured output: %d request(s) sampled a token their grammar refuses", len(refused)
            )
            self._fail(refused, "a token outside the grammar was sampled (an engine bug)")
        for request_id, matcher, token_id in rows:
            if not matcher.accept(token_id):  # allowed a moment ago; only a backend fault gets here
                self._failures[request_id] = f"the grammar refused an allowed token: {matcher.error()}"
                del self._matchers[request_id]

    def _fail(self, errors: dict[str, str], reason: str) -> None:
        """Forget the matchers of these requests and raise ``RequestExecutionError`` naming them."""
        for request_id, detail in errors.items():
            self._matchers.pop(request_id, None)
            # First line only: llguidance appends a marker line saying verbose errors are off.
            detail = detail.strip().splitlines()[0] if detail.strip() else ""
            self._failures[request_id] = f"{reason}: {detail}" if detail else reason
        messages = sorted({self._failures[request_id] for request_id in errors})
        raise RequestExecutionError(
            f"structured output failed for {len(errors)} request(s): {'; '.join(messages)}", set(errors)
        )

    def close(self) -> None:
        self._settle()
        self._fill_thread.shutdown(wait=True)

    def _settle(self) -> None:
        """Wait for a fill still running: it reads the matchers that the caller may change.
        Only a step that failed between ``start_bitmask`` and ``finish_bitmask`` leaves one."""
        pending = self._pending
        if pending is not None:
            self._pending = None
            try:
                pending.future.result()
            except Exception:  # that step failed already; this mask is not used
                logger.debug("discarding the bitmask of a failed step", exc_info=True)


def _log_build_failure(future: Future[GrammarBackend]) -> None:
    # Said once at start-up; each constrained request then fails with the reason.
    exc = future.exception()
    if exc is not None:
        logger.warning("structured output unavailable: the grammar backend could not be built: %s", exc)
