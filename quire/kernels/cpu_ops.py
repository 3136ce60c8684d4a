"""The C++ CPU kernels in ``csrc/`` (``cpu_ops.cpp``, ``packed_gemm.cpp``), compiled on first use.

The build is cached by torch (``~/.cache/torch_extensions`` or ``$TORCH_EXTENSIONS_DIR``), so only
the first process on a machine pays for it (about a minute on 2 cores). If there is no compiler,
or the build fails, ``cpu_ops()`` returns ``None`` once, logs why, and every caller keeps its
pure-torch path: the kernels make quire faster, never able to run where it otherwise could not.
Set ``QUIRE_CPU_KERNELS=0`` to turn them off (for comparisons and for testing the fallback).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

DISABLE_ENV = "QUIRE_CPU_KERNELS"
_SOURCES = [Path(__file__).parent / "csrc" / name for name in ("cpu_ops.cpp", "packed_gemm.cpp")]
# -march=native: the kernels are built on the machine that runs them (AVX2/FMA paths where the
# CPU has them, portable loops elsewhere). -fopenmp makes at::parallel_for use torch's own
# OpenMP thread pool (the same libgomp that torch loaded) instead of running serially.
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]


def cpu_kernels_enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def cpu_ops() -> ModuleType | None:
    """The compiled module, or ``None`` where it is disabled or cannot be built."""
    if not cpu_kernels_enabled():
        return None
    try:
        from torch.utils.cpp_extension import load

        sources = [str(path) for path in _SOURCES]
        return load(name="quire_cpu_ops", sources=sources, extra_cflags=_CFLAGS, verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure means "use the fallback"
        logger.warning("compiled CPU kernels unavailable, using pure-torch paths: %s", exc)
        return None
