"""The shapes-world bundle the package ships (`rlaifv serve` serves it by default): loaded, never rebuilt here."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shapes_bundle() -> Path:
    from rlaifv.service.default_model import default_bundle

    return default_bundle()
