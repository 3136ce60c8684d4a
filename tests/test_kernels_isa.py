"""Run-time dispatch of the compiled CPU kernels by instruction-set tier (issue 12).

Feature parsing and tier choice run on canned ``/proc/cpuinfo`` text from three kinds of server;
the kernels themselves are built for every tier this CPU supports and compared with the same
references as tests/test_models.py. The chosen tier is built once per session by conftest and one
more tier (avx2 where the chosen one is higher: the code AMD/AVX2 machines run) is checked in the
default suite; the other tiers are ``slow`` (about a minute of compiling each, then cached).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from test_models import check_fused_elementwise, check_packed_linear

from quire.kernels import cpu_ops as kernels
from quire.kernels.isa import (
    ISA_ENV,
    TIERS,
    IsaRegistry,
    IsaTier,
    chosen_tier,
    parse_cpu_flags,
    supported_tiers,
)

_COMMON = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 "
    "ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl pni pclmulqdq ssse3 fma cx16 pcid "
    "sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand lahf_lm abm fsgsbase bmi1 avx2 smep "
    "bmi2 erms invpcid rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 xsaves"
)
# AMD EPYC 7763 (Zen 3): AVX2 only.
AMD_AVX2 = f"{_COMMON} mmxext fxsr_opt sse4a misalignsse topoext clzero vaes vpclmulqdq rdpid fsrm"
# Intel Xeon Gold 6248 (Cascade Lake): AVX-512 without BF16 or AMX.
INTEL_AVX512 = f"{_COMMON} avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni arat pku ospke"
# Intel Xeon with AVX512-BF16 but no AMX (the AMX flags masked, as on this project's VMs).
INTEL_AVX512_BF16 = (
    f"{_COMMON} avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl avx_vnni avx512_bf16 avx512vbmi "
    "avx512_vbmi2 gfni avx512_vnni avx512_bitalg avx512_vpopcntdq avx512_fp16 arch_capabilities"
)
# Intel Xeon Platinum 8480+ (Sapphire Rapids) with AMX.
INTEL_SPR_AMX = f"{INTEL_AVX512_BF16} amx_bf16 amx_tile amx_int8"


def _cpuinfo(flags: str, vendor: str = "GenuineIntel") -> str:
    one = f"processor\t: 0\nvendor_id\t: {vendor}\nmodel name\t: X\nflags\t\t: {flags}\n\n"
    return one + one.replace("processor\t: 0", "processor\t: 1").replace(flags, "fpu")


@pytest.fixture(autouse=True)
def _no_isa_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ISA_ENV, raising=False)


@pytest.mark.parametrize(
    ("flags", "vendor", "highest", "supported"),
    [
        (AMD_AVX2, "AuthenticAMD", "avx2", ["portable", "avx2"]),
        (INTEL_AVX512, "GenuineIntel", "avx512", ["portable", "avx2", "avx512"]),
        (INTEL_AVX512_BF16, "GenuineIntel", "avx512_bf16", ["portable", "avx2", "avx512", "avx512_bf16"]),
        (INTEL_SPR_AMX, "GenuineIntel", "amx", ["portable", "avx2", "avx512", "avx512_bf16", "amx"]),
    ],
)
def test_tier_choice_from_cpuinfo(flags: str, vendor: str, highest: str, supported: list[str]) -> None:
    parsed = parse_cpu_flags(_cpuinfo(flags, vendor), machine="x86_64")
    assert parsed == frozenset(flags.split())  # the first processor's flags only
    assert [tier.name for tier in supported_tiers(parsed)] == supported
    assert chosen_tier(parsed).name == highest
    assert TIERS.highest(parsed).name == highest


def test_non_x86_and_incomplete_cpus_get_the_portable_tier() -> None:
    assert parse_cpu_flags(_cpuinfo(AMD_AVX2), machine="aarch64") == frozenset()
    assert parse_cpu_flags("Features\t: fp asimd\n", machine="x86_64") == frozenset()
    assert chosen_tier(frozenset()).name == "portable"
    # A VM that hides BMI2 cannot run x86-64-v3 code even with AVX2 and FMA.
    assert chosen_tier(frozenset(AMD_AVX2.split()) - {"bmi2"}).name == "portable"
    # AVX-512 foundation alone (no BW/VL/DQ) is not the avx512 tier.
    partial = frozenset(AMD_AVX2.split()) | {"avx512f", "avx512_bf16"}
    assert chosen_tier(partial).name == "avx2"


def test_isa_cap_lowers_the_tier(monkeypatch: pytest.MonkeyPatch) -> None:
    spr = frozenset(INTEL_SPR_AMX.split())
    assert chosen_tier(spr, cap="avx2").name == "avx2"
    assert chosen_tier(spr, cap=" AVX512 ").name == "avx512"
    assert chosen_tier(spr, cap="amx").name == "amx"
    assert chosen_tier(spr, cap="portable").name == "portable"
    monkeypatch.setenv(ISA_ENV, "avx512_bf16")
    assert chosen_tier(spr).name == "avx512_bf16"
    monkeypatch.setenv(ISA_ENV, "")
    assert chosen_tier(spr).name == "amx"


def test_isa_cap_the_cpu_cannot_run_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    amd = frozenset(AMD_AVX2.split())
    with pytest.raises(ValueError, match=r"cannot run the avx512 tier.*avx512bw.*supports: portable, avx2$"):
        chosen_tier(amd, cap="avx512")
    monkeypatch.setenv(ISA_ENV, "amx")
    with pytest.raises(ValueError, match="QUIRE_CPU_ISA='amx'.*amx_bf16 amx_tile"):
        chosen_tier(frozenset(INTEL_AVX512_BF16.split()))


def test_unknown_isa_cap_lists_the_valid_names(monkeypatch: pytest.MonkeyPatch) -> None:
    valid = "portable, avx2, avx512, avx512_bf16, amx"
    with pytest.raises(ValueError, match=f"unknown .* 'avx1024'; valid tiers: {valid}"):
        chosen_tier(frozenset(AMD_AVX2.split()), cap="avx1024")
    monkeypatch.setenv(ISA_ENV, "native")
    kernels._default_ops.cache_clear()  # cpu_ops() reads the environment once per process
    try:
        with pytest.raises(ValueError, match="valid tiers"):
            kernels.cpu_ops()  # a bad cap fails loudly instead of silently picking a tier
    finally:
        kernels._default_ops.cache_clear()


def test_tiers_have_explicit_isa_flags() -> None:
    assert TIERS.names() == ("portable", "avx2", "avx512", "avx512_bf16", "amx")
    cflags = {tier.name: kernels.tier_cflags(tier) for tier in TIERS.tiers}
    assert cflags["portable"] == ["-O3", "-fopenmp"]
    assert cflags["avx2"] == ["-O3", "-fopenmp", "-march=x86-64-v3", "-mtune=native"]
    assert "-march=x86-64-v4" in cflags["avx512"] and "-mavx512bf16" not in cflags["avx512"]
    assert "-mavx512bf16" in cflags["avx512_bf16"]
    assert {"-mamx-tile", "-mamx-bf16", "-mavx512bf16"} <= set(cflags["amx"])
    assert not any("-march=native" in flags for flags in cflags.values())


def test_tier_objects_are_validated() -> None:
    with pytest.raises(ValueError, match="-march=native"):
        IsaTier("x", frozenset({"avx2"}), ("-march=native",), "")
    with pytest.raises(ValueError, match="identifier"):
        IsaTier("", frozenset(), (), "")
    with pytest.raises(ValueError, match="frozenset"):
        IsaTier("x", {"avx2"}, (), "")  # type: ignore[arg-type]
    base, avx2 = TIERS.get("portable"), TIERS.get("avx2")
    with pytest.raises(ValueError, match="must require everything"):
        IsaRegistry((base, TIERS.get("avx512"), avx2))
    with pytest.raises(ValueError, match="duplicate"):
        IsaRegistry((base, avx2, avx2))
    with pytest.raises(ValueError, match="any CPU"):
        IsaRegistry((avx2,))


def test_build_key_and_directory_include_the_tier(tmp_path: Path) -> None:
    keys = {name: kernels.current_build_key(TIERS.get(name)) for name in ("portable", "avx2", "avx512")}
    assert len({key.digest() for key in keys.values()}) == 3
    for name, key in keys.items():
        assert key.tier == name
        assert kernels.kernel_build_dir(key, tmp_path).name.split("-")[1] == name
    assert "-march=x86-64-v3" in keys["avx2"].toolchain
    assert kernels.module_name(TIERS.get("avx2")) == "quire_cpu_ops_avx2"


def test_loading_builds_with_the_tier_flags_and_says_which(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capsys
) -> None:
    """The load itself, with torch's builder stubbed out: flags, module name, and the one line."""
    import torch.utils.cpp_extension

    calls: list[dict[str, object]] = []

    def fake_load(**kwargs: object) -> object:
        calls.append(kwargs)
        return "module"

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path))
    highest = kernels.highest_tier().name
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        assert kernels._load.__wrapped__("portable") == "module"
    assert calls[0]["name"] == "quire_cpu_ops_portable"
    assert calls[0]["extra_cflags"] == ["-O3", "-fopenmp"]
    assert Path(str(calls[0]["build_directory"])).name.split("-")[1] == "portable"
    line = f"quire: CPU kernels: portable (CPU supports: {highest})"
    assert line in capsys.readouterr().err
    assert line in caplog.messages


def test_asking_for_a_tier_the_cpu_lacks_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset(AMD_AVX2.split()))
    with pytest.raises(ValueError, match="cannot run the avx512 kernels"):
        kernels.cpu_ops("avx512")
    with pytest.raises(ValueError, match="valid tiers"):
        kernels.cpu_ops("sse9")


def _tier_params() -> list[object]:
    """Every tier this CPU supports; the chosen one and one more run by default, the rest are slow."""
    try:
        chosen = chosen_tier().name
    except ValueError:  # a bad QUIRE_CPU_ISA: test_models and cpu_ops() report it
        chosen = supported_tiers()[-1].name
    names = [tier.name for tier in supported_tiers()]
    extra = "avx2" if chosen != "avx2" and "avx2" in names else "portable"
    return [
        pytest.param(name, marks=() if name in (chosen, extra) else pytest.mark.slow, id=name)
        for name in names
    ]


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the CPU kernels")
@pytest.mark.parametrize("tier", _tier_params())
def test_every_supported_tier_matches_the_torch_reference(tier: str) -> None:
    if not kernels.cpu_kernels_enabled():
        pytest.skip("CPU kernels disabled")
    ops = kernels.cpu_ops(tier)
    assert ops is not None, f"the {tier} kernels failed to build (see the log)"
    for bf16_panels in (False, True):
        check_packed_linear(ops, bf16_panels)
    check_fused_elementwise(ops)
