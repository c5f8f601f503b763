"""The deploy tests import their helpers (deploy_helpers.py) from this folder, and share one rendering."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from deploy_helpers import K8S, OVERLAYS, render


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Overlay name -> its objects, rendered once per session."""
    assert {"gpu", "cpu-dev"} <= set(OVERLAYS), OVERLAYS
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}
