"""Where jetspec keeps what it builds and measures (converted models, wheels, cost calibrations)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$JETSPEC_CACHE`` if set and non-empty, else ``~/.cache/jetspec``."""
    root = os.environ.get("JETSPEC_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "jetspec"
