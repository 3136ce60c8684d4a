"""Shared by the kernel tests: one instruction-set tier's compiled CPU kernels."""

from __future__ import annotations

import shutil
from types import ModuleType

import pytest

from quire.kernels import cpu_ops as kernels


def compiled_cpu_ops(tier: str) -> ModuleType:
    """The kernels built for ``tier``; the test is skipped where nothing can be compiled."""
    if shutil.which("c++") is None or not kernels.cpu_kernels_enabled():
        pytest.skip("no compiled CPU kernels here")
    module = kernels.cpu_ops(tier)
    assert module is not None, f"the {tier} kernels failed to build (see the log)"
    return module
