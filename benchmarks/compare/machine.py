"""The CPU a comparison ran on: its model name, the flags that decide which kernels and dtypes are
fast on it, and the kernel tier quire chose. Printed with every table and saved in results.json,
because numbers from an AVX2 EPYC and an AMX Xeon are not comparable (issue 12)."""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from quire.kernels.isa import ISA_ENV, TIERS, parse_cpu_flags

# The flags that separate the machines this comparison runs on: AVX2-only EPYCs, AVX-512 Xeons,
# and Xeons with AVX512-BF16 / AMX, where bf16 is the fast compute type.
RELEVANT_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_bf16",
    "avx512_vnni",
    "amx_bf16",
    "amx_int8",
    "amx_tile",
)


@dataclass(frozen=True)
class CpuReport:
    """The CPU model, which of ``RELEVANT_FLAGS`` it has, and quire's kernel tier on it."""

    model_name: str
    flags: dict[str, bool]
    quire_tier: str  # the tier quire's kernels use (capped by $QUIRE_CPU_ISA)
    highest_tier: str  # the highest tier this CPU supports
    isa_cap: str | None = None  # $QUIRE_CPU_ISA when set

    def __post_init__(self) -> None:
        if set(self.flags) != set(RELEVANT_FLAGS):
            raise ValueError(f"CpuReport.flags must have exactly {', '.join(RELEVANT_FLAGS)}")
        for name in ("quire_tier", "highest_tier"):
            TIERS.get(getattr(self, name))  # a ValueError naming the valid tiers

    @classmethod
    def from_cpuinfo(cls, text: str, machine: str | None = None, isa_cap: str | None = None) -> CpuReport:
        """From ``/proc/cpuinfo`` text; ``isa_cap`` as ``$QUIRE_CPU_ISA`` (must be a tier this CPU runs)."""
        flags = parse_cpu_flags(text, machine)
        cap = isa_cap.strip() if isa_cap and isa_cap.strip() else None
        return cls(
            model_name=_model_name(text) or platform.processor() or "unknown",
            flags={name: name in flags for name in RELEVANT_FLAGS},
            quire_tier=TIERS.select(flags, cap).name,
            highest_tier=TIERS.highest(flags).name,
            isa_cap=cap,
        )

    def line(self) -> str:
        """One line for a table, e.g. ``CPU: AMD EPYC 7551 | has: avx2 fma | lacks: avx512f ...``."""
        has = " ".join(name for name, on in self.flags.items() if on) or "none"
        lacks = " ".join(name for name, on in self.flags.items() if not on) or "none"
        tier = f"quire kernel tier: {self.quire_tier}"
        if self.quire_tier != self.highest_tier:
            tier += f" (capped by {ISA_ENV}={self.isa_cap}; CPU supports {self.highest_tier})"
        return f"CPU: {self.model_name} | has: {has} | lacks: {lacks} | {tier}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _model_name(cpuinfo: str) -> str | None:
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == "model name":
            return " ".join(value.split())
    return None


def this_cpu(isa_cap: str | None) -> CpuReport:
    """This machine's report (``isa_cap``: the ``$QUIRE_CPU_ISA`` the quire servers will inherit)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    return CpuReport.from_cpuinfo(text, isa_cap=isa_cap)
