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

import torch

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


# madvise advice number, from Linux's mman-common.h.
_MADV_HUGEPAGE = 14
HUGE_PAGE_BYTES = 2 << 20


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask Linux to back the whole 2 MiB pages inside ``tensor``'s memory with transparent huge
    pages (``madvise(MADV_HUGEPAGE)``); True if it agreed. Call it before the memory is first
    written: pages already faulted in stay 4 KiB until khugepaged gets to them.

    For the KV cache: decode attention reads each sequence's blocks from anywhere in the pool, and
    with 4 KiB pages nearly every block read also misses the TLB. Distributions commonly set
    transparent huge pages to ``madvise``, so without the advice a pool never gets them.
    A no-op (False) off Linux, for non-CPU tensors and for tensors smaller than one huge page."""
    if tensor.device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    libc = _glibc()
    madvise = getattr(libc, "madvise", None) if libc is not None else None
    if madvise is None:
        return False
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first = -(-start // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    last = end // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if last <= first:
        return False
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_HUGEPAGE) == 0
