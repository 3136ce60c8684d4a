"""Keep freed activation memory in the process for reuse (glibc on Linux; CPU inference).

PyTorch's CPU allocator has no cache: each step's activations are malloc'd and freed. glibc serves
requests above its mmap threshold with fresh ``mmap`` pages and unmaps them on free, and it trims
the heap top back to the OS past its trim threshold; either way the next step's tensors of the same
size come back as new pages, which the kernel must fault in and zero on first touch. A 2048-token
prefill step allocates about 60 MB of activations per layer, so that is gigabytes of page faults
per step, charged to whichever kernel first writes the output. Raising both thresholds keeps freed
blocks in the heap, where the next step finds them already mapped.

The cost is that the process keeps its peak activation memory (a step's worth, bounded by the
token budget) instead of handing it back between steps.

Loading a model leaves the opposite kind of garbage: temporaries of the weight conversion (a GGUF
file's blocks repacked, dtype casts) that are freed once and never needed again. With the high trim
threshold they would stay resident for the life of the process (about 100 MB for the default
model), so the worker hands them back once, right after loading (``release_free_heap``), and the
model runner hands back the kept activations whenever the engine runs out of work (idle, the
speed of reuse buys nothing; the first busy step faults them in again).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

# mallopt parameter numbers, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc caps the mmap threshold at 32 MiB on 64-bit systems (HEAP_MAX_SIZE / 2); larger values are
# refused. Blocks bigger than this still get their own mapping.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def release_free_heap() -> bool:
    """Return the heap's free pages to the OS once (glibc's ``malloc_trim``); True if any were.
    A no-op where the C library has no ``malloc_trim`` (musl, macOS)."""
    libc = _glibc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))


def retain_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse; True if it agreed. A no-op elsewhere."""
    libc = _glibc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None:  # not Linux, or not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        logger.info("glibc refused the malloc thresholds; freed activations go back to the OS")
    return ok
