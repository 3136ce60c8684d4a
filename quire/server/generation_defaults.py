"""Default sampling parameters for requests that leave them unset (``--generation-config``).

Model makers ship the settings their model is meant to be sampled with in
``generation_config.json`` (``temperature``, ``top_p``, ...). With ``--generation-config auto``
(the default) quire uses them, as vLLM does, for every request that does not set the parameter
itself; ``vllm`` or ``none`` keep quire's neutral defaults (temperature 1.0, no top-p/top-k/min-p
cut, no repetition penalty, no token limit beyond the context); a folder path reads that folder's
``generation_config.json`` instead of the model's.

Only these keys are read: ``temperature``, ``top_p``, ``top_k``, ``min_p``,
``repetition_penalty`` and ``max_new_tokens`` (the default ``max_tokens``, capped by the room the
prompt leaves in the context, as vLLM does). Others, such as
``do_sample`` or ``eos_token_id`` (the tokenizer reads that one), are not sampling defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from quire.sampling import SamplingParams
from quire.tokenizer.hf_tokenizer import read_json_object

GENERATION_CONFIG_FILE = "generation_config.json"
NEUTRAL_SOURCES = ("vllm", "none")
_NEUTRAL = "quire's neutral defaults"
# generation_config.json key -> SamplingDefaults field.
_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request gets for each sampling field it leaves unset; None = quire's neutral value.

    ``source`` says where the values came from, for the start-up line. Validated at construction
    with ``SamplingParams``' own checks, so a bad generation_config.json fails at start-up rather
    than in every request.
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None
    source: str = _NEUTRAL

    def __post_init__(self) -> None:
        try:
            SamplingParams(**self.values())
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid default sampling parameters from {self.source}: {exc}") from None

    def values(self) -> dict[str, Any]:
        """The fields that are set, by name."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "source" and getattr(self, f.name) is not None
        }

    def describe(self) -> str:
        """One line for the start-up log."""
        values = self.values()
        if not values:
            neutral = "quire's neutral values (temperature 1.0, no top-p/top-k/min-p cut, no penalty)"
            where = "" if self.source == _NEUTRAL else f"; {self.source} sets none"
            return f"default sampling parameters: {neutral}{where}"
        shown = ", ".join(f"{name}={value}" for name, value in values.items())
        return f"default sampling parameters from {self.source}: {shown} (a request's own values win)"


def load_sampling_defaults(generation_config: str, model_path: str | Path) -> SamplingDefaults:
    """Resolve ``--generation-config``: ``auto`` (the model directory's file, if any), ``vllm`` /
    ``none`` (neutral), or a folder holding a generation_config.json. Raises ``ValueError``."""
    if generation_config in NEUTRAL_SOURCES:
        return SamplingDefaults()
    if generation_config == "auto":
        model_dir = Path(model_path)
        if not model_dir.is_dir() or not (model_dir / GENERATION_CONFIG_FILE).is_file():
            return SamplingDefaults()  # a .gguf file, or a model that ships no generation config
        return _from_file(model_dir / GENERATION_CONFIG_FILE)
    folder = Path(generation_config)
    if not (folder / GENERATION_CONFIG_FILE).is_file():
        raise ValueError(
            f"--generation-config {generation_config!r}: expected auto, vllm, none or a folder holding "
            f"{GENERATION_CONFIG_FILE}, and {folder / GENERATION_CONFIG_FILE} does not exist"
        )
    return _from_file(folder / GENERATION_CONFIG_FILE)


def _from_file(path: Path) -> SamplingDefaults:
    data = read_json_object(path)
    values = {field: data[key] for key, field in _KEYS.items() if data.get(key) is not None}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{path}: {name} must be a number, got {value!r}")
    return SamplingDefaults(**values, source=str(path))
