"""The user's rlaifv cache folder, shared by what keeps things between runs (demo builds, weight-file hashes)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """RLAIFV_CACHE_DIR, else $XDG_CACHE_HOME/rlaifv, else ~/.cache/rlaifv. Not a model folder (it may be read-only
    or shared) nor a run's (later runs in other folders use the same models)."""
    explicit = os.environ.get("RLAIFV_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "rlaifv"
