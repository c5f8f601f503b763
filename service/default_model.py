"""The embedded default model: the shapes-world bundle, built on first use into a cache folder."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """RLAIFV_CACHE_DIR, else $XDG_CACHE_HOME/rlaifv, else ~/.cache/rlaifv."""
    explicit = os.environ.get("RLAIFV_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "rlaifv"


def default_bundle(seed: int = 0, *, progress: bool = True) -> Path:
    """Path of the shapes-world bundle for `seed`, building it (about 10 minutes on 2 CPU cores) if absent."""
    from trainer.shapes.pipeline import DemoConfig, build_demo

    config = DemoConfig(seed=seed)
    folder = cache_root() / f"shapes-{config.fingerprint()}"
    bundle = folder / "run" / "bundle"
    if (bundle / "rlaifv.json").is_file():
        return bundle
    return build_demo(folder, config, progress=progress)
