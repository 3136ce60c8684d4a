"""Build a model from a Hugging Face checkpoint directory (``config.json`` + ``*.safetensors``).

Tensors are read memory-mapped, one at a time, and copied straight into the model's parameters
(converting dtype and device on the way), so peak memory stays near the model's own size. A model
declares where every checkpoint tensor lands via ``checkpoint_layout()``; the loader checks the
checkpoint against it and fails with a message that names the tensor and the file.
"""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from quire.models.hf_config import ModelArchConfig
from quire.models.registry import resolve_model_class
from quire.worker.attention import AttentionBackend

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

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


def resolve_dtype(
    requested: str | torch.dtype, checkpoint_dtype: str | None, device: str | torch.device
) -> torch.dtype:
    """The compute dtype for ``requested`` (``"auto"``, ``"float32"``, ``"bfloat16"``, ...).

    ``"auto"`` is float32 on CPU (fp32 GEMMs are the fast path without AVX-512 BF16) and the
    checkpoint's own dtype elsewhere, float32 when the checkpoint does not say.
    """
    if isinstance(requested, torch.dtype):
        if requested not in DTYPES.values():
            raise ValueError(f"unsupported dtype {requested}; use float32, bfloat16 or float16")
        return requested
    if requested == "auto":
        if torch.device(device).type == "cpu":
            return torch.float32
        return DTYPES.get(checkpoint_dtype or "", torch.float32)
    if requested not in DTYPES:
        raise ValueError(f"unknown dtype {requested!r}; use 'auto', 'float32', 'bfloat16' or 'float16'")
    return DTYPES[requested]


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
) -> nn.Module:
    """Construct the model for the checkpoint at ``path`` and fill it with the checkpoint's weights.

    The returned module is in eval mode with ``requires_grad`` off; its ``config`` attribute is
    the parsed ``ModelArchConfig``. ``progress`` shows a tqdm bar on stderr.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"model path {path} is not a directory; pass a Hugging Face checkpoint directory")
    config = ModelArchConfig.from_dir(path)
    model_cls = resolve_model_class([config.architecture])
    files = checkpoint_files(path)
    device = torch.device(device)
    dtype = resolve_dtype(dtype, config.torch_dtype, device)
    model = model_cls(
        config,
        dtype=dtype,
        device=device,
        attention_backend=attention_backend,
        max_positions=max_positions,
    )
    load_weights(model, files, progress=progress)
    if hasattr(model, "prepare_for_inference"):
        model.prepare_for_inference()
    return model.eval()


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
