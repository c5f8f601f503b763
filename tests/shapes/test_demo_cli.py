"""`rlaifv demo build --ship`: the CLI, not the trainer, knows where the service keeps its default bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from rlaifv.cli.main import app
from rlaifv.service.default_model import SHIPPED_BUNDLE
from rlaifv.trainer.shapes import pipeline, ship
from rlaifv.trainer.shapes.cli import demo_app


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    """Record what the build and the shipping step are asked to do, without training."""
    seen: dict[str, Any] = {}

    def fake_build(folder: Path, config: Any) -> Path:
        seen["build"] = (Path(folder), config.seed)
        return Path(folder) / "run" / "bundle"

    def fake_ship(folder: Path, config: Any, target: Path, **kwargs: Any) -> dict[str, Any]:
        seen["ship"] = (Path(folder), Path(target), kwargs["command"])
        return {"targets": {}}

    monkeypatch.setattr(pipeline, "build_demo", fake_build)
    monkeypatch.setattr(ship, "ship", fake_ship)
    return seen


def test_rlaifv_demo_build_ship_writes_the_service_default_bundle(calls: dict[str, Any], tmp_path: Path) -> None:
    import torch

    result = CliRunner().invoke(app, ["demo", "build", "--seed", "2", "--cache-dir", str(tmp_path), "--ship"])
    assert result.exit_code == 0, result.output
    assert calls["build"] == (tmp_path, 2)
    assert calls["ship"] == (
        tmp_path,
        SHIPPED_BUNDLE,
        f"rlaifv demo build --seed 2 --threads {torch.get_num_threads()} --ship",
    )


def test_the_demo_alone_builds_but_refuses_to_ship(calls: dict[str, Any], tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(demo_app(), ["build", "--cache-dir", str(tmp_path)]).exit_code == 0
    refused = runner.invoke(demo_app(), ["build", "--cache-dir", str(tmp_path), "--ship"])
    assert refused.exit_code == 2 and "--ship" in refused.output
    assert "ship" not in calls
