"""Build a model from a Hugging Face checkpoint directory (``config.json`` + ``*.safetensors``)
or a single GGUF file (``quire.models.gguf``): two weight formats behind one ``WeightFormat``
interface, chosen from the path.

Tensors are read memory-mapped, one at a time, and copied straight into the model's parameters
(converting dtype and device on the way), so peak memory stays near the model's own size. A model
declares where every checkpoint tensor lands via ``checkpoint_layout()``; the loader checks the
checkpoint against it and fails with a message that names the tensor and the file.
"""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from quire.config import QUANTIZATION_METHODS
from quire.models.dtype_policy import DTYPES, choose_dtype  # noqa: F401 - DTYPES re-exported
from quire.models.hf_config import ModelArchConfig
from quire.models.registry import resolve_model_class
from quire.worker.attention import AttentionBackend

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class WeightSlot:
    """Where one checkpoint tensor goes: rows ``start .. start + shape[0]`` of parameter ``param``.

    A tensor that fills a whole parameter has ``start == 0`` and the parameter's shape; fused
    parameters (q/k/v, gate/up) are filled by several tensors at increasing ``start``.
    """

    param: str
    start: int
    shape: tuple[int, ...]


class LoadableModel(Protocol):
    """What the loader needs from a model class besides being an ``nn.Module``."""

    def checkpoint_layout(self) -> dict[str, WeightSlot]: ...

    def ignored_checkpoint_weights(self, name: str) -> bool: ...


@dataclass(frozen=True)
class WeightFormat:
    """One on-disk weight format: how to recognise a path, read its arch config, fill a model.

    ``fill`` receives the freshly built model and copies (or attaches) every weight; it raises
    ``ValueError`` naming the tensor and file on any mismatch."""

    name: str
    matches: Callable[[Path], bool]
    read_arch_config: Callable[[Path], ModelArchConfig]
    fill: Callable[[nn.Module, Path, bool], None]
    # Whether ``quantization=`` applies (a GGUF file is quantized already).
    accepts_quantization: bool


def _safetensors_fill(model: nn.Module, path: Path, progress: bool) -> None:
    load_weights(model, checkpoint_files(path), progress=progress)


def _gguf_matches(path: Path) -> bool:
    if not path.is_file():  # a directory never imports the GGUF package
        return False
    from quire.models.gguf import is_gguf_file

    return is_gguf_file(path)


def _gguf_config(path: Path) -> ModelArchConfig:
    from quire.models.gguf import read_gguf_arch_config

    return read_gguf_arch_config(path)


def _gguf_fill(model: nn.Module, path: Path, progress: bool) -> None:
    from quire.models.gguf import load_gguf_weights

    load_gguf_weights(model, path, progress=progress)
    # The reader's records of the file refer to each other, so its memory map would stay (~the
    # file's size of resident memory, measured in the engine process) until the next full
    # collection; every weight kept is a copy, so release the map now.
    gc.collect()


# First match wins. The GGUF loader is imported only when a .gguf path is given.
_WEIGHT_FORMATS: tuple[WeightFormat, ...] = (
    WeightFormat("gguf", _gguf_matches, _gguf_config, _gguf_fill, accepts_quantization=False),
    WeightFormat(
        "safetensors", Path.is_dir, ModelArchConfig.from_dir, _safetensors_fill, accepts_quantization=True
    ),
)


def weight_format_for(path: str | Path) -> WeightFormat:
    """The format of the model at ``path``: a ``.gguf`` file or a Hugging Face directory."""
    path = Path(path)
    for fmt in _WEIGHT_FORMATS:
        if fmt.matches(path):
            return fmt
    if path.is_file():
        raise ValueError(
            f"model path {path} is a file but not a GGUF file (.gguf); pass a .gguf file or a "
            "Hugging Face checkpoint directory"
        )
    raise ValueError(
        f"model path {path} is not a directory; pass a Hugging Face checkpoint directory or a .gguf file"
    )


def read_arch_config(path: str | Path) -> ModelArchConfig:
    """The architecture config of the model at ``path`` (directory or ``.gguf`` file)."""
    path = Path(path)
    return weight_format_for(path).read_arch_config(path)


def resolve_dtype(
    requested: str | torch.dtype, checkpoint_dtype: str | None, device: str | torch.device
) -> torch.dtype:
    """The compute dtype for ``requested`` (``"auto"``, ``"float32"``, ``"bfloat16"``, ...).

    ``"auto"`` follows quire.models.dtype_policy (fp32 on CPUs unless bf16 hardware, a bf16
    checkpoint and quire's bf16 kernels for the tier all line up; the checkpoint's dtype elsewhere);
    :func:`quire.models.dtype_policy.choose_dtype` also returns the reason.
    """
    return choose_dtype(requested, checkpoint_dtype, device).dtype


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards its index names, or ``model.safetensors``,
    or (with neither) every ``*.safetensors`` file in the directory."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        return _shards_from_index(index)
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    found = ", ".join(sorted(p.name for p in path.iterdir())) if path.is_dir() else "nothing"
    hint = " (*.bin/*.pth checkpoints must be converted to safetensors first)" if ".bin" in found else ""
    raise ValueError(f"no *.safetensors weights in {path}; found: {found}{hint}")


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{index} is not a valid safetensors index (needs a 'weight_map' object): {exc}"
        ) from exc
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: 'weight_map' must be a non-empty object of tensor name -> shard file")
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise ValueError(f"shard {shard.name} named in {index} is missing from {index.parent}")
    return shards


def load_model(
    path: str | Path,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device = "cpu",
    *,
    progress: bool = True,
    max_positions: int | None = None,
    attention_backend: AttentionBackend | None = None,
    quantization: str | None = None,
    arch_config: ModelArchConfig | None = None,
    quantized_activations: str | None = None,
) -> nn.Module:
    """Construct the model for the checkpoint at ``path`` (a Hugging Face directory or a ``.gguf``
    file) and fill it with the checkpoint's weights.

    ``quantization`` (``"int8"`` or ``"int4"``) keeps every decoder linear of a safetensors
    checkpoint in that weight-only block format (``quire.models.quant_linear``), and the embedding
    and LM head in int8 (``VOCAB_METHODS``). A GGUF file's quantized tensors are kept as they are
    stored. ``quantized_activations="int8"`` then makes every Q8_0/Q4_0/Q4_1 weight quantize its
    input to int8 (``quire.models.quant_linear.apply_quantized_activations``; a ``ValueError`` for a
    model without such weights).
    The returned module is in eval mode with ``requires_grad`` off; its ``config`` attribute is
    the parsed ``ModelArchConfig`` (pass ``arch_config`` when already read, to skip reading it
    again). ``progress`` shows a tqdm bar on stderr.
    """
    path = Path(path)
    fmt = weight_format_for(path)
    if quantization is not None:
        _check_quantization(quantization, fmt, path)
    config = arch_config or fmt.read_arch_config(path)
    model_cls = resolve_model_class([config.architecture])
    device = torch.device(device)
    dtype = resolve_dtype(dtype, config.torch_dtype, device)
    model = model_cls(
        config,
        dtype=dtype,
        device=device,
        attention_backend=attention_backend,
        max_positions=max_positions,
    )
    fmt.fill(model, path, progress)
    if quantization is not None:
        from quire.models.quant_linear import VOCAB_METHODS, quantize_weight

        model.quantize_linears(lambda weight: quantize_weight(weight, quantization))
        model.quantize_vocab_matrices(lambda weight: quantize_weight(weight, VOCAB_METHODS[quantization]))
    if quantized_activations is not None:
        from quire.models.quant_linear import apply_quantized_activations

        apply_quantized_activations(model, quantized_activations)
    if hasattr(model, "prepare_for_inference"):
        model.prepare_for_inference()
    return model.eval()


def _check_quantization(quantization: str, fmt: WeightFormat, path: Path) -> None:
    if quantization not in QUANTIZATION_METHODS:
        raise ValueError(
            f"unknown quantization {quantization!r}; use one of: {', '.join(QUANTIZATION_METHODS)}"
        )
    if not fmt.accepts_quantization:
        raise ValueError(
            f"quantization={quantization!r} does not apply to {path}: the {fmt.name} file is already "
            "quantized (its tensors are used as stored); drop the quantization option"
        )


def load_weights(model: nn.Module, files: list[Path], *, progress: bool = True) -> None:
    """Copy every tensor of ``files`` into ``model`` per its ``checkpoint_layout``; check coverage."""
    assert hasattr(model, "checkpoint_layout"), f"{type(model).__name__} does not implement LoadableModel"
    layout = model.checkpoint_layout()
    params = dict(model.named_parameters())
    loaded: dict[str, Path] = {}
    with ExitStack() as stack:
        handles = [(file, stack.enter_context(_open(file))) for file in files]
        total = sum(len(handle.keys()) for _, handle in handles)
        bar = stack.enter_context(
            tqdm(total=total, desc="Loading weights", unit="tensor", file=sys.stderr, disable=not progress)
        )
        for file, handle in handles:
            for name in handle.keys():
                bar.update()
                slot = layout.get(name)
                if slot is None:
                    if model.ignored_checkpoint_weights(name):
                        continue
                    raise ValueError(
                        f"unexpected tensor {name!r} in {file}: the {type(model).__name__} model has no such "
                        "weight; does config.json's 'architectures' match this checkpoint?"
                    )
                if name in loaded:
                    raise ValueError(f"tensor {name!r} appears in both {loaded[name]} and {file}")
                _copy_into(params[slot.param], slot, handle, name, file)
                loaded[name] = file
    missing = [name for name in layout if name not in loaded]
    if missing:
        first = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(
            f"checkpoint {files[0].parent} is missing weight {first!r} with shape "
            f"{list(layout[first].shape)}{more}"
        )


def _open(file: Path) -> Any:  # safetensors does not export its handle type
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"cannot read safetensors file {file}: {exc}") from exc


def _copy_into(param: torch.Tensor, slot: WeightSlot, handle: Any, name: str, file: Path) -> None:
    found = tuple(handle.get_slice(name).get_shape())
    if found != slot.shape:
        raise ValueError(
            f"tensor {name!r} in {file} has shape {list(found)}, expected {list(slot.shape)}; "
            "config.json does not match the weights"
        )
    target = param.data[slot.start : slot.start + slot.shape[0]]
    # copy_ converts dtype and moves to the parameter's device in one pass.
    target.copy_(handle.get_tensor(name))
