"""Fill a built quire model from a GGUF file's tensors.

Each tensor is mapped to its Hugging Face name and located through the model's
``checkpoint_layout`` (the same map the safetensors loader uses), so fused q|k|v and gate|up
rows land where they do for a Hugging Face checkpoint. Then, per model parameter:

- every part F32/F16/BF16 (and every 1-D tensor: norms, biases): widened to fp32 and copied in;
- otherwise the owning module (``Linear`` or ``VocabMatrix``) gets a weight method and its dense
  parameter is released: one ``QuantizedLinearWeight`` over the concatenated block rows when all
  parts share a type, else a ``StackedLinearWeight`` of per-type runs (see ``stacked.py``).

A quantized ``token_embd`` serves lookups by dequantizing the looked-up rows, and a tied LM head
multiplies by the same object: no fp32 copy of the vocabulary matrix is ever made.

``rope_freqs.weight`` (llama.cpp's form of Llama 3.1-style RoPE scaling: one divisor per
rotary frequency) is not a parameter: it rescales the model's rotary tables.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from quire.gguf_file import GGUFTensor, open_gguf
from quire.models.gguf.metadata import GGUFMetadata, gguf_arch
from quire.models.gguf.stacked import DenseRows, StackedLinearWeight
from quire.models.gguf.tensor_names import hf_tensor_name, permuted_heads, unpermute_rows
from quire.models.llama import LinearMethod
from quire.models.quant_linear import QUANT_TYPES, QuantizedLinearWeight

DENSE_TYPES = ("F32", "F16", "BF16")
ROPE_FREQS_TENSOR = "rope_freqs.weight"
SUPPORTED_TYPES = (*DENSE_TYPES, *QUANT_TYPES)


@dataclass(frozen=True)
class _Part:
    """One GGUF tensor bound for rows ``start .. start + rows`` of a model parameter."""

    name: str
    start: int
    shape: tuple[int, ...]  # (rows, cols) or (rows,), outermost first like torch
    type_name: str
    data: np.ndarray  # the reader's memory-mapped view
    row_order: torch.Tensor | None  # undoes the converter's q/k row interleaving

    @property
    def quantized(self) -> bool:
        return self.type_name not in DENSE_TYPES

    def dense(self) -> torch.Tensor:
        """The tensor in fp32 (a fresh copy, never a view of the file)."""
        qtype = gguf.GGMLQuantizationType[self.type_name]
        values = torch.from_numpy(np.array(gguf.quants.dequantize(self.data, qtype), dtype=np.float32))
        values = values.reshape(self.shape)
        return values if self.row_order is None else values[self.row_order]

    def raw_rows(self) -> torch.Tensor:
        """The block bytes ``[rows, row_bytes]`` in Hugging Face row order: a view of the mapped
        file where no reordering is needed (``QuantizedLinearWeight`` copies what it keeps)."""
        with warnings.catch_warnings():
            # The view is read-only (the file is mapped read-only) and is only ever read from.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            raw = torch.from_numpy(self.data)
        return raw if self.row_order is None else raw[self.row_order]


def load_gguf_weights(model: nn.Module, path: str | Path, *, progress: bool = True) -> None:
    """Copy or attach every tensor of the GGUF file at ``path`` into ``model``; check coverage."""
    source = str(path)
    _check_model(model, source)
    file = open_gguf(path)
    if file.byte_order != "<":
        # Numbers of a big-endian file would need swapping, block scales included; none is made.
        raise ValueError(f"{source} is a big-endian GGUF file; quire loads little-endian GGUF weights")
    arch = gguf_arch(GGUFMetadata(file).string("general.architecture"), source)
    config = model.config
    layout = model.checkpoint_layout()
    parts: dict[str, list[_Part]] = {}
    loaded: set[str] = set()
    for tensor in file.tensors:
        if tensor.name == ROPE_FREQS_TENSOR:
            _check_dense(tensor, source)
            model.rotary.divide_frequencies(torch.from_numpy(np.array(tensor.data, dtype=np.float32)))
            continue
        hf_name = hf_tensor_name(tensor.name, source)
        slot = layout.get(hf_name)
        if slot is None:
            if model.ignored_checkpoint_weights(hf_name):
                continue
            raise ValueError(
                f"{source}: tensor {tensor.name!r} ({hf_name}) has no place in this "
                f"{type(model).__name__}; does the metadata match the tensors?"
            )
        shape = tuple(reversed(tensor.shape))
        if shape != slot.shape:
            raise ValueError(
                f"{source}: tensor {tensor.name!r} has shape {list(shape)}, expected {list(slot.shape)} "
                "from the file's metadata"
            )
        heads = permuted_heads(hf_name, config.num_attention_heads, config.num_key_value_heads)
        row_order = unpermute_rows(shape[0], heads) if arch.permuted_qk and heads is not None else None
        type_name = _type_name(tensor, source)
        parts.setdefault(slot.param, []).append(
            _Part(tensor.name, slot.start, shape, type_name, tensor.data, row_order)
        )
        loaded.add(hf_name)
    missing = [name for name in layout if name not in loaded]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{source} is missing the tensor for {missing[0]!r}{more}")
    params = dict(model.named_parameters())
    for param_name, param_parts in tqdm(
        parts.items(), desc="Loading GGUF", unit="param", file=sys.stderr, disable=not progress
    ):
        param_parts.sort(key=lambda part: part.start)
        _fill(model, param_name, params[param_name], param_parts)


def _check_model(model: nn.Module, source: str) -> None:
    probe = model.model.norm.weight  # never released: the compute dtype and device
    if probe.dtype != torch.float32 or probe.device.type != "cpu":
        raise ValueError(
            f"{source}: GGUF models run in float32 on the CPU; got dtype "
            f"{str(probe.dtype).removeprefix('torch.')} on {probe.device} (use dtype 'auto' or 'float32')"
        )


def _check_dense(tensor: GGUFTensor, source: str) -> None:
    if tensor.tensor_type.name not in ("F32", "F16"):
        raise ValueError(
            f"{source}: tensor {tensor.name} has type {tensor.tensor_type.name}; expected F32 or F16"
        )


def _type_name(tensor: GGUFTensor, source: str) -> str:
    name = tensor.tensor_type.name
    if name not in SUPPORTED_TYPES:
        raise ValueError(
            f"{source}: tensor {tensor.name} has type {name}; quire supports {', '.join(SUPPORTED_TYPES)}"
        )
    return name


def _fill(model: nn.Module, param_name: str, param: torch.Tensor, parts: list[_Part]) -> None:
    if param.dim() == 1 or not any(part.quantized for part in parts):
        for part in parts:
            param.data[part.start : part.start + part.shape[0]].copy_(part.dense())
        return
    owner = model.get_submodule(param_name.rpartition(".")[0])
    if not hasattr(owner, "set_weight_method"):
        raise ValueError(
            f"tensor {parts[0].name!r} is quantized, but {param_name} cannot hold a quantized weight"
        )
    owner.set_weight_method(_weight_method(parts, param.shape[1]))


def _weight_method(parts: list[_Part], in_features: int) -> LinearMethod:
    """One method over consecutive parts: runs of the same type are concatenated row-wise."""
    runs: list[LinearMethod] = []
    for type_name, run in groupby(parts, key=lambda part: part.type_name):
        run_parts = list(run)
        if type_name in DENSE_TYPES:
            runs.append(DenseRows(torch.cat([part.dense() for part in run_parts])))
        else:
            raw = torch.cat([part.raw_rows() for part in run_parts])
            runs.append(QuantizedLinearWeight(raw, type_name, in_features))
    return runs[0] if len(runs) == 1 else StackedLinearWeight(runs)
