"""The RLAIF-V reward service: FastAPI app, scheduler, engine, jobs, metrics, and the `serve`/`bench service` commands.

Importing the package is cheap: FastAPI, torch and transformers load only when
`create_app` (or the engine) is used, so `rlaifv --help` stays instant.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlaifv.service.app import create_app
    from rlaifv.service.settings import Settings

__all__ = ["Settings", "create_app"]

_LAZY = {"create_app": "rlaifv.service.app", "Settings": "rlaifv.service.settings"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'service' has no attribute {name!r}")
