"""The shapes-world bundle `rlaifv serve` serves by default, built once per session (seed 0, ~8 min on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shapes_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.shapes.pipeline import DemoConfig, build_demo

    return build_demo(tmp_path_factory.mktemp("shapes"), DemoConfig(seed=0), progress=False)
