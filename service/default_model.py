"""The embedded default model: the shapes-world bundle that ships inside this package.

`rlaifv demo build --ship` trains it (trainer/shapes) and writes it here with
its provenance (`shipped.json`: recipe version and fingerprint, seed, command,
build time, targets) and its evaluation report (`report.json`). The service
only loads it, like any other bundle: nothing here imports the trainer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SHIPPED_BUNDLE = Path(__file__).resolve().parent / "default_bundle"
SHIPPED_FILE = "shipped.json"


class MissingDefaultBundle(RuntimeError):
    """The package was installed without its default bundle (or it was deleted)."""


def default_bundle() -> Path:
    """The shipped shapes-world bundle; loads in seconds, no training."""
    if not (SHIPPED_BUNDLE / "rlaifv.json").is_file():
        raise MissingDefaultBundle(
            f"no default bundle at {SHIPPED_BUNDLE}: pass --bundle (RLAIFV_BUNDLE), "
            "or rebuild the shapes world with `rlaifv demo build --ship`"
        )
    return SHIPPED_BUNDLE


def shipped_provenance() -> dict[str, Any]:
    """What `rlaifv demo build --ship` recorded about the shipped bundle."""
    provenance: dict[str, Any] = json.loads((default_bundle() / SHIPPED_FILE).read_text())
    return provenance
