"""A small shapes-world bundle, built once per session with a fixed seed (the quick recipe)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shapes_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.shapes.pipeline import DemoConfig, build_demo

    return build_demo(tmp_path_factory.mktemp("shapes"), DemoConfig.quick(seed=0), progress=False)
