"""How ``--dtype auto`` picks the compute dtype, and the reason it gives (issue 12).

``auto`` takes the checkpoint's dtype on CUDA. On a CPU it is bf16 only when all three hold:

1. the kernel tier in use (:func:`quire.kernels.isa.chosen_tier`) has bf16 hardware: AVX512-BF16
   dot products or AMX tiles (a CPU without them emulates bf16 in fp32 registers and gains nothing
   but the rounding);
2. the checkpoint is bf16 (like vLLM's ``auto``: never widen a checkpoint's precision loss into a
   default the user did not ask for, and never narrow an fp32 checkpoint);
3. quire has bf16 compute kernels for that tier, registered with :func:`register_bf16_kernels`.

Otherwise it is float32 with the first of those that failed as the reason. The third condition is
why nothing flips yet: quire's bf16 mode is plain ``F.linear`` plus the torch attention fallback,
measured 2x slower than its fp32 path at concurrency 1 on an AMX Xeon (issue 12), so ``auto``
stays fp32 until a kernel set for the tier registers itself here. Explicit dtypes are always taken
as asked.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

import torch

from quire.kernels.isa import ISA_ENV, TIERS, IsaTier

DTYPES: MappingProxyType[str, torch.dtype] = MappingProxyType(
    {
        "float32": torch.float32,
        "float": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "half": torch.float16,
        "fp16": torch.float16,
    }
)
# /proc/cpuinfo flags that make bf16 a fast compute type: either one is enough.
BF16_HARDWARE_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})

# Modules whose import registers bf16 kernel sets. Imported lazily by the policy, so importing this
# module builds nothing; empty until a tier's bf16 kernels exist.
_BUILTIN_BF16_KERNEL_MODULES: tuple[str, ...] = ()


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def tier_has_bf16_hardware(tier: IsaTier) -> bool:
    """Whether code built for ``tier`` may use AVX512-BF16 or AMX bf16 instructions."""
    return bool(tier.requires & BF16_HARDWARE_FLAGS)


def _always() -> bool:
    return True


@dataclass(frozen=True)
class Bf16KernelSet:
    """quire's bf16 compute kernels for one instruction-set tier.

    ``available`` is asked at decision time (e.g. whether the tier's compiled module built), so a
    failed build falls back to fp32 instead of to slow bf16.
    """

    tier: str
    description: str
    available: Callable[[], bool] = _always

    def __post_init__(self) -> None:
        tier = TIERS.get(self.tier)  # a ValueError listing the valid tiers for a typo
        if not tier_has_bf16_hardware(tier):
            raise ValueError(
                f"Bf16KernelSet.tier {self.tier!r} has no bf16 hardware (needs one of "
                f"{', '.join(sorted(BF16_HARDWARE_FLAGS))}); bf16 kernels only pay on such tiers"
            )
        if not self.description.strip():
            raise ValueError("Bf16KernelSet.description must say what the kernels are")


class Bf16KernelRegistry:
    """Tier name -> the bf16 kernel set quire has for it. Append-only; filled at import time."""

    def __init__(self) -> None:
        self._sets: dict[str, Bf16KernelSet] = {}

    def add(self, kernels: Bf16KernelSet) -> None:
        existing = self._sets.get(kernels.tier)
        if existing is not None and existing != kernels:
            raise ValueError(
                f"bf16 kernels for the {kernels.tier} tier are already registered ({existing.description}); "
                f"cannot register {kernels.description!r} too"
            )
        self._sets[kernels.tier] = kernels

    def get(self, tier: str) -> Bf16KernelSet | None:
        return self._sets.get(tier)

    def tiers(self) -> frozenset[str]:
        return frozenset(self._sets)


# The process-wide registry, written only by register_bf16_kernels while kernel modules import
# (the point of a registry); decisions read it and never change it.
_BF16_KERNELS = Bf16KernelRegistry()


def register_bf16_kernels(
    tier: str, description: str, available: Callable[[], bool] = _always
) -> Bf16KernelSet:
    """Declare that quire has bf16 compute kernels for ``tier``; ``auto`` may then pick bf16 there."""
    kernels = Bf16KernelSet(tier, description, available)
    _BF16_KERNELS.add(kernels)
    return kernels


def registered_bf16_kernels() -> Bf16KernelRegistry:
    """The process-wide registry, after importing the modules that fill it."""
    for module in _BUILTIN_BF16_KERNEL_MODULES:
        importlib.import_module(module)
    return _BF16_KERNELS


@dataclass(frozen=True)
class DtypeChoice:
    """The compute dtype, how it was asked for (``auto`` or ``explicit``) and why; ``str()`` is the
    start-up line, e.g. ``float32 (auto): checkpoint is float32``."""

    dtype: torch.dtype
    mode: str
    reason: str

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES.values():
            raise ValueError(f"DtypeChoice.dtype must be float32, bfloat16 or float16, got {self.dtype}")
        if self.mode not in ("auto", "explicit"):
            raise ValueError(f"DtypeChoice.mode must be 'auto' or 'explicit', got {self.mode!r}")
        if not self.reason:
            raise ValueError("DtypeChoice.reason must not be empty")

    def __str__(self) -> str:
        return f"{dtype_name(self.dtype)} ({self.mode}): {self.reason}"


@dataclass(frozen=True)
class CpuDtypeFacts:
    """What the CPU decision depends on, gathered once so the decision itself is a pure function.

    ``tier`` is the kernel tier in use and ``highest_tier`` the highest this CPU supports (they
    differ under ``$QUIRE_CPU_ISA``); ``bf16_kernels`` is the registered kernel set for ``tier``,
    ``None`` when there is none or it is unavailable; ``kernels_enabled`` is False under
    ``QUIRE_CPU_KERNELS=0``.
    """

    tier: IsaTier
    highest_tier: IsaTier
    bf16_kernels: Bf16KernelSet | None
    kernels_enabled: bool = True

    def __post_init__(self) -> None:
        if self.bf16_kernels is not None and self.bf16_kernels.tier != self.tier.name:
            raise ValueError(
                f"CpuDtypeFacts.bf16_kernels are for the {self.bf16_kernels.tier} tier, "
                f"not the {self.tier.name} tier in use"
            )


def cpu_auto_dtype(checkpoint_dtype: str | None, facts: CpuDtypeFacts) -> DtypeChoice:
    """``auto`` on a CPU: bf16 when the tier, the checkpoint and quire's kernels all allow it."""
    tier = facts.tier.name
    if not tier_has_bf16_hardware(facts.tier):
        if tier_has_bf16_hardware(facts.highest_tier):
            where = f"the {tier} tier in use ({ISA_ENV} caps this {facts.highest_tier.name} CPU)"
        else:
            where = f"this CPU ({tier} tier)"
        return _fp32(f"{where} has no AVX512-BF16 or AMX, fp32 is its fast compute type")
    checkpoint = DTYPES.get(checkpoint_dtype or "")
    if checkpoint is None:
        return _fp32(f"{_undeclared(checkpoint_dtype)}, so there is no bf16 precision to keep")
    if checkpoint != torch.bfloat16:
        return _fp32(f"checkpoint is {dtype_name(checkpoint)}")
    if not facts.kernels_enabled:
        return _fp32("compiled CPU kernels are off (QUIRE_CPU_KERNELS=0), so bf16 would run on slow paths")
    if facts.bf16_kernels is None:
        return _fp32(f"quire has no bf16 kernels for the {tier} tier yet")
    return DtypeChoice(
        torch.bfloat16,
        "auto",
        f"this CPU ({tier} tier) computes bf16 in hardware, the checkpoint is bfloat16 and quire has "
        f"bf16 kernels for the tier ({facts.bf16_kernels.description})",
    )


def _fp32(reason: str) -> DtypeChoice:
    return DtypeChoice(torch.float32, "auto", reason)


def _undeclared(checkpoint_dtype: str | None) -> str:
    if checkpoint_dtype:
        return f"checkpoint dtype {checkpoint_dtype!r} is not one quire computes in"
    return "checkpoint declares no dtype (GGUF, or no torch_dtype in config.json)"


def device_auto_dtype(checkpoint_dtype: str | None, device_type: str) -> DtypeChoice:
    """``auto`` off the CPU: the checkpoint's dtype, float32 when it names none quire supports."""
    checkpoint = DTYPES.get(checkpoint_dtype or "")
    if checkpoint is None:
        return _fp32(f"on {device_type} auto takes the checkpoint's dtype; {_undeclared(checkpoint_dtype)}")
    return DtypeChoice(checkpoint, "auto", f"on {device_type} auto takes the checkpoint's dtype")


def current_cpu_facts(registry: Bf16KernelRegistry | None = None) -> CpuDtypeFacts:
    """This process's facts: the chosen tier (a ``ValueError`` for a bad ``$QUIRE_CPU_ISA``), the
    CPU's highest tier, and the registered bf16 kernels for the chosen tier if they are available."""
    from quire.kernels.cpu_ops import cpu_kernels_enabled  # the kernel loader; imported when deciding
    from quire.kernels.isa import chosen_tier, highest_tier

    tier = chosen_tier()
    kernels = (registry if registry is not None else registered_bf16_kernels()).get(tier.name)
    if kernels is not None and not kernels.available():
        kernels = None
    return CpuDtypeFacts(tier, highest_tier(), kernels, cpu_kernels_enabled())


def choose_dtype(
    requested: str | torch.dtype,
    checkpoint_dtype: str | None,
    device: str | torch.device,
    cpu_facts: CpuDtypeFacts | None = None,
) -> DtypeChoice:
    """The compute dtype for ``requested`` (``"auto"``, ``"float32"``, ``torch.bfloat16``, ...) and why.

    ``checkpoint_dtype`` is the checkpoint's ``torch_dtype`` (None for GGUF, whose weights are
    blocks, not a torch dtype). ``cpu_facts`` defaults to this process's (:func:`current_cpu_facts`).
    """
    if isinstance(requested, torch.dtype):
        if requested not in DTYPES.values():
            raise ValueError(f"unsupported dtype {requested}; use float32, bfloat16 or float16")
        return DtypeChoice(requested, "explicit", "requested")
    if requested == "auto":
        device_type = torch.device(device).type
        if device_type != "cpu":
            return device_auto_dtype(checkpoint_dtype, device_type)
        return cpu_auto_dtype(checkpoint_dtype, cpu_facts or current_cpu_facts())
    if requested not in DTYPES:
        raise ValueError(f"unknown dtype {requested!r}; use 'auto', 'float32', 'bfloat16' or 'float16'")
    return DtypeChoice(DTYPES[requested], "explicit", f"requested with --dtype {requested}")
