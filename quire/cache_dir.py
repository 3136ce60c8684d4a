"""Where quire keeps what it builds once per machine (the demo checkpoint, the compiled kernels)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR_ENV = "QUIRE_CACHE_DIR"


def quire_cache_dir() -> Path:
    """``$QUIRE_CACHE_DIR``, or ``~/.cache/quire``."""
    override = os.environ.get(CACHE_DIR_ENV)
    return Path(override).expanduser() if override else Path.home() / ".cache" / "quire"
