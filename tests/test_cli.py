"""The ``quire`` command line (parsed, never run) and the compiled-kernel cache key (computed, never
built): neither needs a model, a server or a compiler."""

from __future__ import annotations

from pathlib import Path

import pytest

from quire.entrypoints.cli import parse_args
from quire.kernels import cpu_ops as kernels
from quire.kernels.cpu_ops import KernelBuildKey, cpu_identity, kernel_build_dir, kernel_cache_root

# --- quire serve --served-model-name (issue 11, defect 13) ---


def test_served_model_name_before_the_model_path_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Was: nargs="+" swallowed the path as a second name, and quire served its random demo model.
    with pytest.raises(SystemExit) as exc:
        parse_args(["serve", "--served-model-name", "tiny", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "--served-model-name=NAME" in err


@pytest.mark.parametrize(
    ("argv", "model", "names"),
    [
        (["serve", "{path}", "--served-model-name", "a", "b"], "{path}", ["a", "b"]),  # vLLM's spelling
        (["serve", "--served-model-name=tiny", "{path}"], "{path}", ["tiny"]),
        (
            ["serve", "{path}", "--served-model-name", "a,b", "--served-model-name", "c"],
            "{path}",
            ["a", "b", "c"],
        ),
        (["serve", "--served-model-name", "demo"], None, ["demo"]),  # a name that is no path: the demo
        (["serve", "{path}"], "{path}", None),
    ],
)
def test_served_model_name_spellings(
    tmp_path: Path, argv: list[str], model: str | None, names: list[str] | None
) -> None:
    ns = parse_args([arg.format(path=tmp_path) for arg in argv])
    assert ns.model == (model.format(path=tmp_path) if model else None)
    assert ns.served_model_name == names


def test_served_model_name_rejects_an_empty_name() -> None:
    with pytest.raises(SystemExit):
        parse_args(["serve", "--served-model-name", ","])


# --- the compiled-kernel cache (issue 11, defect 14) ---

_KEY = KernelBuildKey(
    cpu="x86_64;flags=avx2 fma", torch="torch=2.13.0+cpu;git=abc", toolchain="cxx=c++", tier="avx2"
)


def test_kernel_build_key_changes_with_cpu_torch_and_toolchain() -> None:
    digests = {
        _KEY.digest(),
        KernelBuildKey(
            cpu="x86_64;flags=avx2 avx512f fma", torch=_KEY.torch, toolchain=_KEY.toolchain, tier=_KEY.tier
        ).digest(),
        KernelBuildKey(cpu=_KEY.cpu, torch=_KEY.torch, toolchain=_KEY.toolchain, tier="avx512").digest(),
        KernelBuildKey(
            cpu=_KEY.cpu, torch="torch=2.12.0+cpu;git=abc", toolchain=_KEY.toolchain, tier=_KEY.tier
        ).digest(),
        KernelBuildKey(
            cpu=_KEY.cpu, torch="torch=2.13.0+cpu;git=def", toolchain=_KEY.toolchain, tier=_KEY.tier
        ).digest(),
        KernelBuildKey(cpu=_KEY.cpu, torch=_KEY.torch, toolchain="cxx=clang++", tier=_KEY.tier).digest(),
    }
    assert len(digests) == 6
    assert (
        KernelBuildKey(cpu=_KEY.cpu, torch=_KEY.torch, toolchain=_KEY.toolchain, tier=_KEY.tier).digest()
        == _KEY.digest()
    )
    with pytest.raises(ValueError):
        KernelBuildKey(cpu="", torch="t", toolchain="c", tier="avx2")


def test_cpu_identity_reads_the_isa_fields_and_ignores_their_order() -> None:
    avx2 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: X\nflags\t\t: fma avx2 sse\n"
    reordered = avx2.replace("fma avx2 sse", "sse avx2 fma").replace("model name\t: X", "model name\t: Y")
    avx512 = avx2.replace("fma avx2 sse", "fma avx2 sse avx512f")
    assert cpu_identity(avx2) == cpu_identity(reordered)  # the marketing name does not matter
    assert cpu_identity(avx2) != cpu_identity(avx512)
    assert "avx2" in cpu_identity(avx2) and "AuthenticAMD" in cpu_identity(avx2)
    # Only the first processor counts: the rest repeat it.
    assert cpu_identity(avx2 + avx512) == cpu_identity(avx2)


def test_kernel_build_dir_is_per_key_and_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from quire import __version__

    other = KernelBuildKey(
        cpu="aarch64;Features=asimd", torch=_KEY.torch, toolchain=_KEY.toolchain, tier=_KEY.tier
    )
    assert kernel_build_dir(_KEY, tmp_path) != kernel_build_dir(other, tmp_path)
    assert kernel_build_dir(_KEY, tmp_path).name == f"{__version__}-avx2-{_KEY.digest()}"
    monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path / "kc"))
    assert kernel_cache_root() == tmp_path / "kc"
    assert kernel_build_dir(_KEY).parent == tmp_path / "kc"
    monkeypatch.delenv(kernels.CACHE_ENV)
    monkeypatch.setenv("QUIRE_CACHE_DIR", str(tmp_path / "qc"))
    assert kernel_cache_root() == tmp_path / "qc" / "kernels"


def test_current_build_key_covers_this_torch_and_cpu() -> None:
    import torch

    key = kernels.current_build_key()
    assert torch.__version__ in key.torch
    assert key.cpu.startswith(__import__("platform").machine())
    assert "-march=native" not in key.toolchain  # the tier's flags decide the instruction set
    assert key.tier == kernels.chosen_tier().name
