"""The C++ CPU kernels in ``csrc/`` (``cpu_ops.cpp`` and the GEMMs it binds), compiled on first use.

The build lives in quire's own cache, one directory per build key:
``$QUIRE_KERNEL_CACHE`` (default ``$QUIRE_CACHE_DIR/kernels`` or ``~/.cache/quire/kernels``) /
``<quire version>-<tier>-<key>``. The key hashes everything the compiled module depends on: the
instruction-set tier it targets (``quire/kernels/isa.py``: explicit ``-march=x86-64-v3``/``-v4``
flags per tier, never ``-march=native``), the CPU it was tuned for (``-mtune=native``), the torch
build and Python ABI it links against, the compiler, and the sources and flags. So virtual environments with different torch builds each keep their
own build instead of rebuilding over each other's, and a cache directory shared by machines with
different CPUs never hands one of them code for another instruction set. Only the first process
per key pays for the build (about a minute on 2 cores), and it says so on stderr.

``cpu_ops()`` loads the tier :func:`quire.kernels.isa.chosen_tier` picks (the highest this CPU
supports, capped by ``$QUIRE_CPU_ISA``) and says once which one it is; ``cpu_ops(tier)`` loads
another supported tier alongside it (tests compare every tier against the torch reference).

If there is no compiler, or the build fails, ``cpu_ops()`` returns ``None`` once, logs why, and
every caller keeps its pure-torch path: the kernels make quire faster, never able to run where it
otherwise could not. Set ``QUIRE_CPU_KERNELS=0`` to turn them off (for comparisons and for
testing the fallback).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from quire.cache_dir import quire_cache_dir
from quire.kernels.isa import TIERS, IsaTier, chosen_tier, cpu_flags, highest_tier

logger = logging.getLogger(__name__)

DISABLE_ENV = "QUIRE_CPU_KERNELS"
CACHE_ENV = "QUIRE_KERNEL_CACHE"
MODULE_NAME = "quire_cpu_ops"  # the compiled module is MODULE_NAME_<tier>
BUILD_NOTICE = "quire: building CPU kernels (about a minute, once per machine and install)"
_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [
    _CSRC / name
    for name in (
        "cpu_ops.cpp",
        "decode_layer.cpp",
        "linear_operand.cpp",
        "packed_gemm.cpp",
        "paged_attention.cpp",
        "quant_a8.cpp",
        "quant_a8_avx2.cpp",
        "quant_a8_vnni.cpp",
        "quant_gemm.cpp",
        "quant_panel.cpp",
    )
]
_HEADERS = [
    _CSRC / name
    for name in (
        "decode_layer.h",
        "kv_cache_element.h",
        "layer_kernels.h",
        "linear_operand.h",
        "packed_gemm.h",
        "panel_tile.h",
        "quant_a8.h",
        "quant_a8_kernel.h",
        "quant_gemm.h",
        "quant_blocks.h",
        "quant_panel.h",
        "quant_simd.h",
        "simd_math.h",
    )
]
# The instruction set comes from the tier's flags (AVX2/FMA paths from the avx2 tier up, portable
# loops below it). -fopenmp makes at::parallel_for use torch's own OpenMP thread pool (the same
# libgomp that torch loaded) instead of running serially.
_BASE_CFLAGS = ("-O3", "-fopenmp")
# /proc/cpuinfo fields that decide what the build may use and what -mtune=native tunes for.
_CPUINFO_FIELDS = ("vendor_id", "cpu family", "model", "flags", "Features", "CPU implementer", "CPU part")


def cpu_kernels_enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class KernelBuildKey:
    """What a compiled kernel module is only valid for; equal keys may share one build."""

    cpu: str  # the CPU identity (what it can run, what -mtune=native tunes for)
    torch: str  # torch version, its git revision, and the Python ABI tag
    toolchain: str  # compiler, sources and flags
    tier: str  # the instruction-set tier (quire.kernels.isa.TIERS) the module is built for

    def __post_init__(self) -> None:
        for name in ("cpu", "torch", "toolchain", "tier"):
            if not getattr(self, name):
                raise ValueError(f"KernelBuildKey.{name} must be a non-empty string")

    def digest(self) -> str:
        text = "\0".join((self.cpu, self.torch, self.toolchain, f"tier={self.tier}"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def cpu_identity(cpuinfo: str | None = None) -> str:
    """The first processor's ISA-relevant /proc/cpuinfo lines (flags sorted), or what
    ``platform`` knows where there is no /proc/cpuinfo."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        name = name.strip()
        if sep and name in _CPUINFO_FIELDS and name not in fields:
            words = value.split()
            fields[name] = " ".join(sorted(words) if name in ("flags", "Features") else words)
    identity = ";".join(f"{name}={fields[name]}" for name in _CPUINFO_FIELDS if name in fields)
    return f"{platform.machine()};{identity or platform.processor() or 'unknown'}"


def torch_identity() -> str:
    import torch

    git = getattr(torch.version, "git_version", "") or ""
    return f"torch={torch.__version__};git={git};python={sys.implementation.cache_tag}"


def tier_cflags(tier: IsaTier) -> list[str]:
    """The compiler flags for building the kernels for ``tier``."""
    return [*_BASE_CFLAGS, *tier.cflags]


def toolchain_identity(tier: IsaTier | None = None) -> str:
    tier = tier if tier is not None else chosen_tier()
    # The source directory is part of the key: torch's build files record absolute paths, so two
    # checkouts with the same sources sharing one directory would rebuild over each other.
    digest = hashlib.sha256(str(_CSRC.resolve()).encode() + b"\0")
    for path in [*_SOURCES, *_HEADERS]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    compiler = os.environ.get("CXX", "c++")
    return f"cxx={compiler};flags={' '.join(tier_cflags(tier))};sources={digest.hexdigest()[:16]}"


def current_build_key(tier: IsaTier | None = None) -> KernelBuildKey:
    """The build key for ``tier`` (default: the chosen tier) on this machine."""
    tier = tier if tier is not None else chosen_tier()
    return KernelBuildKey(
        cpu=cpu_identity(), torch=torch_identity(), toolchain=toolchain_identity(tier), tier=tier.name
    )


def kernel_cache_root() -> Path:
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    return quire_cache_dir() / "kernels"


def kernel_build_dir(key: KernelBuildKey, root: Path | None = None) -> Path:
    """The directory the kernels for ``key`` are built in and loaded from."""
    from quire import __version__

    return (root if root is not None else kernel_cache_root()) / f"{__version__}-{key.tier}-{key.digest()}"


def module_name(tier: IsaTier) -> str:
    """The compiled module's name for ``tier``: one name per tier, so tiers can load side by side."""
    return f"{MODULE_NAME}_{tier.name}"


def _built_library(build_dir: Path, name: str) -> Path:
    import sysconfig

    # torch's loader names the module <name>.so on Linux and macOS, <name>.pyd on Windows.
    suffix = ".pyd" if sysconfig.get_platform().startswith("win") else ".so"
    return build_dir / f"{name}{suffix}"


def cpu_ops(tier: str | None = None) -> ModuleType | None:
    """The compiled module, or ``None`` where it is disabled or cannot be built.

    Without ``tier``: the kernels for :func:`quire.kernels.isa.chosen_tier` (the highest tier this
    CPU supports, capped by ``$QUIRE_CPU_ISA``; a bad cap raises ``ValueError``). With ``tier``
    (a name in ``quire.kernels.isa.TIERS``): that tier's kernels, which this CPU must support.
    Each tier is built or loaded once per process.
    """
    if tier is None:
        return _default_ops()
    if not cpu_kernels_enabled():
        return None
    wanted = TIERS.get(tier)
    if not wanted.supported_by(cpu_flags()):
        raise ValueError(
            f"this CPU cannot run the {wanted.name} kernels (highest tier: {highest_tier().name})"
        )
    return _load(wanted.name)


@functools.cache
def _default_ops() -> ModuleType | None:
    # Cached: hot paths call cpu_ops() every step; the environment and the CPU are read once.
    if not cpu_kernels_enabled():
        return None
    return _load(chosen_tier().name)


@functools.cache
def _load(tier_name: str) -> ModuleType | None:
    tier = TIERS.get(tier_name)
    try:
        from torch.utils.cpp_extension import load

        build_dir = kernel_build_dir(current_build_key(tier))
        build_dir.mkdir(parents=True, exist_ok=True)
        name = module_name(tier)
        if not _built_library(build_dir, name).exists():
            # A silent minute on first start looks like a hang; one line says what is going on.
            print(f"{BUILD_NOTICE} [{tier.name}]", file=sys.stderr, flush=True)
        sources = [str(path) for path in _SOURCES]
        module = load(
            name=name,
            sources=sources,
            extra_cflags=tier_cflags(tier),
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - any build failure means "use the fallback"
        logger.warning("compiled CPU kernels (%s) unavailable, using pure-torch paths: %s", tier.name, exc)
        return None
    message = f"quire: CPU kernels: {tier.name} (CPU supports: {highest_tier().name})"
    logger.info(message)
    print(message, file=sys.stderr, flush=True)
    return module
