"""Run grammar compilation on a thread with a large stack.

llguidance walks a grammar recursively when it validates or compiles it: a JSON schema whose
``$ref``s chain a few thousand definitions deep, or a Lark grammar with a few thousand rules each
referring to the next, overflows an 8 MiB thread stack and kills the process with a segfault,
not an exception (measured: a 106 KB schema of 3,000 chained ``$ref``s). The size limit on
constraints (``params.MAX_SPEC_CHARS``) bounds the depth; 64 MiB of stack handles the deepest
chain that fits in it (7,000 ``$ref``s, 16,000 Lark rules) with room to spare. The stack is
reserved address space: only the pages a deep grammar touches are ever committed.

One worker thread per process, started on first use, serves every caller (the API process's
validation, the engine's compilation); callers wait for their result.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

STACK_BYTES = 64 << 20


class LargeStackWorker:
    """One thread with a ``stack_bytes`` stack that runs the functions handed to it."""

    # threading.stack_size is process-wide and applies to threads started while it is set.
    _stack_size_lock = threading.Lock()

    def __init__(self, stack_bytes: int = STACK_BYTES, name: str = "quire-grammar") -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        with self._stack_size_lock:
            previous = threading.stack_size(stack_bytes)
            try:
                # The executor starts its one thread on the first submit: start it now.
                self._thread = self._executor.submit(threading.current_thread).result()
            finally:
                threading.stack_size(previous)

    def run(self, work: Callable[[], T]) -> T:
        """``work()``'s result (or exception), computed on the large-stack thread."""
        if threading.current_thread() is self._thread:
            return work()
        return self._executor.submit(work).result()


class _Shared:
    """The process's worker, made on first use. A holder object rather than a bare global: the
    worker is a process resource, like a logger, shared by whoever compiles grammars."""

    _lock = threading.Lock()
    _worker: LargeStackWorker | None = None

    @classmethod
    def forget(cls) -> None:
        cls._lock = threading.Lock()
        cls._worker = None

    @classmethod
    def worker(cls) -> LargeStackWorker:
        with cls._lock:
            if cls._worker is None:
                cls._worker = LargeStackWorker()
            return cls._worker


# A forked child has no copy of the worker thread: it makes its own on first use.
os.register_at_fork(after_in_child=_Shared.forget)


def run_with_large_stack(work: Callable[[], T]) -> T:
    """Run ``work`` on the process's large-stack thread and return its result."""
    return _Shared.worker().run(work)
