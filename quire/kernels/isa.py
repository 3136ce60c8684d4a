"""Instruction-set tiers for the compiled CPU kernels, and which one this process uses.

The kernels in ``csrc/`` are compiled once per tier, each with explicit ``-march=x86-64-vN``-style
flags instead of ``-march=native``, so what a build contains is decided by the tier and not by
whatever the compiler guesses about the build machine. The tiers are ordered; each one's CPU
requirements include those of the tier below it:

========================  ==========================================  ============================
tier                      CPU flags required (``/proc/cpuinfo``)      compiler flags
========================  ==========================================  ============================
``portable``              none (any CPU, any architecture)            none (the compiler default)
``avx2``                  avx2 fma f16c (and the rest of x86-64-v3)   ``-march=x86-64-v3``
``avx512``                avx512f/bw/vl/dq/cd (x86-64-v4)             ``-march=x86-64-v4``
``avx512_bf16``           avx512 + avx512_bf16                        ``... -mavx512bf16``
``amx``                   avx512_bf16 + amx_tile + amx_bf16           ``... -mamx-tile -mamx-bf16``
========================  ==========================================  ============================

Every x86 tier also passes ``-mtune=native`` (scheduling only; never changes the instruction set).
The tier used is the highest one the CPU supports, capped by ``$QUIRE_CPU_ISA`` (for tests and
comparisons, e.g. ``QUIRE_CPU_ISA=avx2`` on an AVX-512 machine). A cap the CPU cannot run, or a
name that is not a tier, is a ``ValueError`` that lists the valid names.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

ISA_ENV = "QUIRE_CPU_ISA"
_X86_64_MACHINES = ("x86_64", "amd64")


@dataclass(frozen=True)
class IsaTier:
    """One instruction-set tier: what the CPU must report, and how to compile for it."""

    name: str
    requires: frozenset[str]  # /proc/cpuinfo ``flags`` words that must all be present
    cflags: tuple[str, ...]  # compiler flags that select this tier's instruction set
    description: str

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"IsaTier.name must be a non-empty identifier, got {self.name!r}")
        if not isinstance(self.requires, frozenset) or not all(
            isinstance(flag, str) and flag for flag in self.requires
        ):
            raise ValueError(f"IsaTier {self.name}: requires must be a frozenset of non-empty strings")
        if not isinstance(self.cflags, tuple) or not all(
            isinstance(flag, str) and flag.startswith("-") for flag in self.cflags
        ):
            raise ValueError(f"IsaTier {self.name}: cflags must be a tuple of compiler flags")
        if "-march=native" in self.cflags:
            raise ValueError(f"IsaTier {self.name}: -march=native would make the build machine-dependent")

    def supported_by(self, cpu_flags: frozenset[str]) -> bool:
        """Whether a CPU reporting ``cpu_flags`` can run code built for this tier."""
        return self.requires <= cpu_flags


@dataclass(frozen=True)
class IsaRegistry:
    """The tiers, lowest first. Each tier's requirements include every lower tier's."""

    tiers: tuple[IsaTier, ...]

    def __post_init__(self) -> None:
        if not self.tiers:
            raise ValueError("IsaRegistry needs at least one tier")
        names = [tier.name for tier in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"IsaRegistry: duplicate tier names in {names}")
        if self.tiers[0].requires:
            raise ValueError(f"IsaRegistry: the lowest tier ({names[0]}) must run on any CPU")
        for lower, higher in zip(self.tiers, self.tiers[1:], strict=False):
            if not lower.requires <= higher.requires:
                raise ValueError(f"IsaRegistry: tier {higher.name} must require everything {lower.name} does")

    def names(self) -> tuple[str, ...]:
        return tuple(tier.name for tier in self.tiers)

    def get(self, name: str) -> IsaTier:
        """The tier called ``name``; a ``ValueError`` listing the valid names otherwise."""
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise ValueError(f"unknown CPU instruction-set tier {name!r}; valid tiers: {', '.join(self.names())}")

    def supported(self, cpu_flags: frozenset[str]) -> tuple[IsaTier, ...]:
        """The tiers a CPU reporting ``cpu_flags`` can run, lowest first (never empty)."""
        return tuple(tier for tier in self.tiers if tier.supported_by(cpu_flags))

    def highest(self, cpu_flags: frozenset[str]) -> IsaTier:
        return self.supported(cpu_flags)[-1]

    def select(self, cpu_flags: frozenset[str], cap: str | None = None) -> IsaTier:
        """The highest tier the CPU supports, or exactly ``cap`` if given (it must be supported)."""
        highest = self.highest(cpu_flags)
        if cap is None or not cap.strip():
            return highest
        tier = self.get(cap.strip().lower())
        if not tier.supported_by(cpu_flags):
            valid = ", ".join(t.name for t in self.supported(cpu_flags))
            missing = " ".join(sorted(tier.requires - cpu_flags))
            raise ValueError(
                f"{ISA_ENV}={cap!r}: this CPU cannot run the {tier.name} tier (it lacks: {missing}); "
                f"tiers this CPU supports: {valid}"
            )
        return tier


_TUNE = ("-mtune=native",)
# x86-64-v3 also enables BMI1/BMI2/LZCNT/MOVBE, which the compiler may emit anywhere: require them.
_AVX2_FLAGS = frozenset({"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "movbe"})
_AVX512_FLAGS = _AVX2_FLAGS | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}
_AVX512_BF16_FLAGS = _AVX512_FLAGS | {"avx512_bf16"}
_AMX_FLAGS = _AVX512_BF16_FLAGS | {"amx_tile", "amx_bf16"}

TIERS = IsaRegistry(
    (
        IsaTier("portable", frozenset(), (), "the compiler's baseline; portable loops only"),
        IsaTier("avx2", _AVX2_FLAGS, ("-march=x86-64-v3", *_TUNE), "AVX2 + FMA + F16C (x86-64-v3)"),
        IsaTier("avx512", _AVX512_FLAGS, ("-march=x86-64-v4", *_TUNE), "AVX-512 F/BW/VL/DQ (x86-64-v4)"),
        IsaTier(
            "avx512_bf16",
            _AVX512_BF16_FLAGS,
            ("-march=x86-64-v4", "-mavx512bf16", *_TUNE),
            "AVX-512 with BF16 dot products",
        ),
        IsaTier(
            "amx",
            _AMX_FLAGS,
            ("-march=x86-64-v4", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", *_TUNE),
            "AVX-512 BF16 + AMX tiles",
        ),
    )
)


def parse_cpu_flags(cpuinfo: str, machine: str | None = None) -> frozenset[str]:
    """The first processor's ``flags`` from ``/proc/cpuinfo`` text; empty off x86-64, where only
    the portable tier applies."""
    machine = (machine if machine is not None else platform.machine()).lower()
    if machine not in _X86_64_MACHINES:
        return frozenset()
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_flags() -> frozenset[str]:
    """This machine's CPU flags (empty where ``/proc/cpuinfo`` is missing or not x86-64)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    return parse_cpu_flags(text)


def highest_tier(flags: frozenset[str] | None = None) -> IsaTier:
    """The highest tier this CPU (or one reporting ``flags``) supports."""
    return TIERS.highest(cpu_flags() if flags is None else flags)


def supported_tiers(flags: frozenset[str] | None = None) -> tuple[IsaTier, ...]:
    """Every tier this CPU (or one reporting ``flags``) supports, lowest first."""
    return TIERS.supported(cpu_flags() if flags is None else flags)


def chosen_tier(flags: frozenset[str] | None = None, cap: str | None = None) -> IsaTier:
    """The tier to use: the highest supported, capped by ``cap`` (default ``$QUIRE_CPU_ISA``)."""
    return TIERS.select(
        cpu_flags() if flags is None else flags, os.environ.get(ISA_ENV) if cap is None else cap
    )
