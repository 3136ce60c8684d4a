"""Read GGUF files (llama.cpp's single-file format): key/value metadata, tensor directory, tensor data.

Used by the model loader (``quire.models.gguf``) and the GGUF tokenizer
(``quire.tokenizer.gguf_tokenizer``); it imports numpy and ``gguf`` (for the type enums and block
sizes) but never torch, so a tokenizer-only process stays light.

Why not ``gguf.GGUFReader``: it builds numpy objects for every element of every array field, and
a real vocabulary is ~150k such elements (tokens, token types, merges). On SmolLM2-135M's
49k-token Q4_1 file (98 MB) it takes 6.0-6.4 s per open, against 27 ms for this reader's full
open and 0.13 s for ``read_gguf_metadata`` of every ``tokenizer.*`` value (gguf 0.19, best of 5
``perf_counter`` timings, warm page cache, 2-core EPYC Zen 1); a server start opens the file
several times (config check, tokenizer, worker, weights). This reader walks the
header with ``struct``, records array fields as ``GGUFArray`` (type, length, where) without
building them, decodes a value to plain Python only when asked, and views tensor data through one
read-only memory map, so pages are read from disk only when touched.

Layout (GGUF v2/v3): magic ``GGUF``; uint32 version; uint64 tensor count; uint64 key/value count;
per key a uint64-length-prefixed UTF-8 name, a uint32 value type and the value (arrays: uint32 item
type, uint64 count, the items); per tensor a name, uint32 dimension count, uint64 dimensions
(innermost first), uint32 GGML type and uint64 data offset; then, padded to ``general.alignment``,
the tensor data. Numbers are little-endian unless the file was written big-endian, which shows as
a byte-swapped version number. tests/test_gguf_file.py checks all of this against ``GGUFReader``.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import gguf
import numpy as np

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
_MAX_DIMS = 4  # GGML_MAX_DIMS: a larger count means a corrupt tensor record
_V = gguf.GGUFValueType
# Fixed-size value types -> struct/numpy format of one item (byte order prefixed per file).
_SCALAR_FORMATS: Mapping[int, str] = MappingProxyType(
    {
        _V.UINT8: "B", _V.INT8: "b", _V.UINT16: "H", _V.INT16: "h", _V.UINT32: "I", _V.INT32: "i",
        _V.FLOAT32: "f", _V.BOOL: "?", _V.UINT64: "Q", _V.INT64: "q", _V.FLOAT64: "d",
    }
)  # fmt: skip
_Q = gguf.GGMLQuantizationType
# Tensor types whose data is a plain numpy array; the others are byte blocks, as GGUFReader gives.
_NUMPY_TENSOR_TYPES: Mapping[int, str] = MappingProxyType(
    {_Q.F32: "f4", _Q.F16: "f2", _Q.F64: "f8", _Q.I8: "i1", _Q.I16: "i2", _Q.I32: "i4", _Q.I64: "i8"}
)


@dataclass(frozen=True)
class GGUFArray:
    """An array metadata field, not decoded: its item type, length, and where its items lie in the
    file (``offset`` of item 0, ``n_bytes`` of all of them)."""

    item_type: gguf.GGUFValueType
    length: int
    offset: int
    n_bytes: int


@dataclass(frozen=True)
class GGUFTensor:
    """One entry of the tensor directory. ``shape`` lists dimensions innermost first, as GGUF does."""

    name: str
    shape: tuple[int, ...]
    tensor_type: gguf.GGMLQuantizationType
    data_offset: int  # absolute, in the file
    n_bytes: int
    _file: GGUFFile = field(repr=False, compare=False)

    @property
    def data(self) -> np.ndarray:
        """A read-only view of the mapped file, laid out like ``GGUFReader``'s ``data``:
        ``[outer dims..., row]`` of numbers for F32/F16/F64/I*, or of bytes for block types (one
        output row's blocks contiguous). Numbers keep the file's byte order."""
        raw = self._file.buffer[self.data_offset : self.data_offset + self.n_bytes]
        outer = tuple(reversed(self.shape[1:]))
        item = _NUMPY_TENSOR_TYPES.get(self.tensor_type)
        if item is not None:
            return raw.view(np.dtype(self._file.byte_order + item)).reshape(*outer, self.shape[0])
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[self.tensor_type]
        return raw.reshape(*outer, self.shape[0] // block_elems * block_bytes)


class GGUFFile:
    """A GGUF file, memory-mapped read-only, with its header parsed.

    ``fields`` holds each key's value: scalars and strings as Python values, arrays as
    ``GGUFArray``; ``value(key)`` decodes any of them to plain Python (lists for arrays), as
    ``GGUFReader``'s ``ReaderField.contents()`` does. Every problem with the file raises
    ``ValueError`` naming it. With ``tensors=False`` only the key/value section is read (the
    tokenizer needs nothing else) and ``tensors`` raises.
    """

    def __init__(self, path: str | Path, *, tensors: bool = True) -> None:
        self.path = Path(path)
        self.source = str(path)
        try:
            size = self.path.stat().st_size
            if size < len(GGUF_MAGIC):
                raise ValueError(
                    f"{self.source}: not a GGUF file (it is empty or shorter than the 'GGUF' magic)"
                )
            # Mapped, never read whole: pages come from disk as the header walk and the tensor
            # views touch them. The map lives as long as this object and any tensor ``data`` view.
            self.buffer: np.ndarray = np.memmap(self.path, dtype=np.uint8, mode="r")
        except OSError as exc:
            raise ValueError(f"cannot read GGUF file {self.source}: {exc}") from exc
        self._view = memoryview(self.buffer)
        cursor = _Cursor(self._view, self.source)
        self.version, self.byte_order = _read_preamble(cursor)
        self.tensor_count, field_count = cursor.scalar("Q"), cursor.scalar("Q")
        self.fields: Mapping[str, Any] = MappingProxyType(_read_fields(cursor, field_count))
        self._tensors: tuple[GGUFTensor, ...] | None = None
        if tensors:
            self._tensors = self._read_tensor_directory(cursor)

    @property
    def tensors(self) -> tuple[GGUFTensor, ...]:
        if self._tensors is None:
            raise ValueError(f"{self.source} was opened without its tensor directory (tensors=False)")
        return self._tensors

    def value(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` as plain Python (lists for arrays); ``default`` if absent."""
        raw = self.fields.get(key, default)
        if not isinstance(raw, GGUFArray):
            return raw
        # One copy of the items' bytes: slicing bytes is ~2x faster than slicing the memory map,
        # which counts with ~100k vocabulary strings.
        chunk = bytes(self._view[raw.offset : raw.offset + raw.n_bytes])
        cursor = _Cursor(chunk, self.source, self.byte_order, base=raw.offset)
        return cursor.array_items(raw.item_type, raw.length, keep=True)

    def values(self, wanted: Callable[[str], bool]) -> dict[str, Any]:
        """The plain Python values of every key satisfying ``wanted``, in file order."""
        return {key: self.value(key) for key in self.fields if wanted(key)}

    def _read_tensor_directory(self, cursor: _Cursor) -> tuple[GGUFTensor, ...]:
        records = [_read_tensor_record(cursor) for _ in range(self.tensor_count)]
        alignment = self.fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
        if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1:
            raise ValueError(
                f"{self.source}: general.alignment must be a positive integer, got {alignment!r}"
            )
        if alignment & (alignment - 1):
            raise ValueError(f"{self.source}: general.alignment must be a power of two, got {alignment}")
        data_start = -(-cursor.pos // alignment) * alignment
        tensors, names = [], set()
        for name, shape, type_id, offset in records:
            if name in names:
                raise ValueError(f"{self.source}: tensor {name!r} appears twice in the tensor directory")
            names.add(name)
            tensor_type, n_bytes = _tensor_type_and_size(name, shape, type_id, self.source)
            start = data_start + offset
            if start + n_bytes > len(self.buffer):
                raise ValueError(
                    f"{self.source}: tensor {name!r} runs past the end of the file "
                    f"(bytes {start}..{start + n_bytes} of {len(self.buffer)}); truncated download?"
                )
            tensors.append(GGUFTensor(name, shape, tensor_type, start, n_bytes, self))
        return tuple(tensors)


def open_gguf(path: str | Path, *, tensors: bool = True) -> GGUFFile:
    """Parse the header of the GGUF file at ``path`` (see ``GGUFFile``)."""
    return GGUFFile(path, tensors=tensors)


def read_gguf_metadata(path: str | Path, wanted: Callable[[str], bool]) -> dict[str, Any]:
    """The metadata values of ``path`` whose key satisfies ``wanted``, as plain Python objects.
    Only the key/value section is read; unwanted arrays are skipped, not decoded."""
    return GGUFFile(path, tensors=False).values(wanted)


def is_gguf_file(path: Path) -> bool:
    """A regular file named ``*.gguf`` or starting with the GGUF magic bytes."""
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with path.open("rb") as handle:
        return handle.read(len(GGUF_MAGIC)) == GGUF_MAGIC


# -- the header walk ----------------------------------------------------------------------------


class _Cursor:
    """Sequential reads from the mapped file (or a copy of part of it) in the file's byte order;
    running off the end raises a ``ValueError`` naming the file and the byte."""

    def __init__(self, view: memoryview | bytes, source: str, order: str = "<", base: int = 0) -> None:
        self.view, self.source, self.pos = view, source, 0
        self.base = base  # file offset of view[0], for messages
        self.order = order

    @property
    def order(self) -> str:
        return self._order

    @order.setter
    def order(self, order: str) -> None:
        self._order = order
        self._length = struct.Struct(order + "Q")  # string lengths: the hot path of a vocabulary

    def truncated(self) -> ValueError:
        return ValueError(f"{self.source}: the GGUF header is truncated at byte {self.base + self.pos}")

    def need(self, size: int) -> None:
        if size < 0 or self.pos + size > len(self.view):
            raise self.truncated()

    def raw(self, size: int) -> memoryview | bytes:
        self.need(size)
        chunk = self.view[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def scalar(self, fmt: str) -> Any:
        full = self.order + fmt
        try:
            (value,) = struct.unpack_from(full, self.view, self.pos)
        except struct.error as exc:
            raise self.truncated() from exc
        self.pos += struct.calcsize(full)
        return value

    def string(self) -> str:
        start = self.pos
        chunk = self.raw(self.scalar("Q"))
        try:
            return str(chunk, "utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{self.source}: the GGUF string at byte {self.base + start} is not UTF-8: {exc}"
            ) from exc

    def value(self, type_id: int) -> Any:
        """A scalar or string value, or a ``GGUFArray`` (skipped over) for an array."""
        if type_id == _V.STRING:
            return self.string()
        if type_id == _V.ARRAY:
            item_type, length = self.value_type(), self.scalar("Q")
            start = self.pos
            self.array_items(item_type, length, keep=False)
            return GGUFArray(item_type, length, start, self.pos - start)
        fmt = _SCALAR_FORMATS.get(type_id)
        if fmt is None:
            raise ValueError(
                f"{self.source}: unknown GGUF value type {type_id} before byte {self.base + self.pos}"
            )
        return self.scalar(fmt)

    def value_type(self) -> gguf.GGUFValueType:
        type_id = self.scalar("I")
        if type_id not in _V._value2member_map_:
            raise ValueError(
                f"{self.source}: unknown GGUF value type {type_id} before byte {self.base + self.pos}"
            )
        return _V(type_id)

    def array_items(self, item_type: int, length: int, *, keep: bool) -> list[Any] | None:
        """Read (``keep``) or step over ``length`` items of ``item_type`` from the cursor."""
        fmt = _SCALAR_FORMATS.get(item_type)
        if fmt is not None:
            dtype = np.dtype(self.order + fmt)
            chunk = self.raw(length * dtype.itemsize)
            return np.frombuffer(chunk, dtype=dtype).tolist() if keep else None
        if item_type == _V.STRING:
            return self._strings(length, keep)
        if item_type == _V.ARRAY:  # nested arrays: rare, so the plain recursive walk
            items = []
            for _ in range(length):
                inner_type, inner_length = self.value_type(), self.scalar("Q")
                items.append(self.array_items(inner_type, inner_length, keep=keep))
            return items if keep else None
        raise ValueError(
            f"{self.source}: unknown GGUF array item type {item_type} before byte {self.base + self.pos}"
        )

    def _strings(self, count: int, keep: bool) -> list[str] | None:
        # One tight loop with a precompiled length ``Struct``: a vocabulary is ~100k strings, so
        # per-string overhead is most of the cost of opening a file. Each string's end is checked
        # before it is sliced: slices past the end would clip silently instead of failing.
        view, unpack, end = self.view, self._length.unpack_from, len(self.view)
        items: list[str] = []
        pos = self.pos
        try:
            for _ in range(count):
                (size,) = unpack(view, pos)
                pos += 8 + size
                if pos > end:
                    break
                if keep:
                    items.append(str(view[pos - size : pos], "utf-8"))
        except struct.error as exc:
            self.pos = pos
            raise self.truncated() from exc
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{self.source}: the GGUF string at byte {self.base + pos - size - 8} is not UTF-8"
            ) from exc
        if pos > end:
            self.pos = pos - size - 8
            raise self.truncated()
        self.pos = pos
        return items if keep else None


def _read_preamble(cursor: _Cursor) -> tuple[int, str]:
    """Check the magic and version; return the version and the file's byte order."""
    if bytes(cursor.raw(len(GGUF_MAGIC))) != GGUF_MAGIC:
        raise ValueError(f"{cursor.source}: not a GGUF file (the first bytes are not 'GGUF')")
    version = cursor.scalar("I")
    if version in SUPPORTED_VERSIONS:
        return version, "<"
    # A big-endian file's small version number reads byte-swapped.
    swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
    if swapped not in SUPPORTED_VERSIONS:
        raise ValueError(
            f"{cursor.source}: GGUF version {version} is not supported (only {', '.join(map(str, SUPPORTED_VERSIONS))})"
        )
    cursor.order = ">"
    return swapped, ">"


def _read_fields(cursor: _Cursor, count: int) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for _ in range(count):
        key = cursor.string()
        if key in fields:
            raise ValueError(f"{cursor.source}: metadata key {key!r} appears twice")
        fields[key] = cursor.value(cursor.scalar("I"))
    return fields


def _read_tensor_record(cursor: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = cursor.string()
    n_dims = cursor.scalar("I")
    if not 1 <= n_dims <= _MAX_DIMS:
        raise ValueError(f"{cursor.source}: tensor {name!r} has {n_dims} dimensions (GGML allows 1 to 4)")
    shape = tuple(cursor.scalar("Q") for _ in range(n_dims))
    return name, shape, cursor.scalar("I"), cursor.scalar("Q")


def _tensor_type_and_size(
    name: str, shape: tuple[int, ...], type_id: int, source: str
) -> tuple[gguf.GGMLQuantizationType, int]:
    if type_id not in _Q._value2member_map_ or _Q(type_id) not in gguf.GGML_QUANT_SIZES:
        raise ValueError(
            f"{source}: tensor {name!r} has GGML type {type_id}, unknown to the installed gguf package"
        )
    tensor_type = _Q(type_id)
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
    if shape[0] % block_elems:
        raise ValueError(
            f"{source}: tensor {name!r} has rows of {shape[0]} values, not a multiple of the "
            f"{block_elems}-value blocks of {tensor_type.name}"
        )
    return tensor_type, math.prod(shape) // block_elems * block_bytes
