"""`rlaifv demo`: `build --ship` (the CLI, not the trainer, knows where the service keeps its default bundle), and
the options every demo command checks before any work."""

from __future__ import annotations

import json
import sys
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


@pytest.fixture
def evaluated(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """`demo eval`'s evaluations, recorded instead of loading the bundle's models."""
    from rlaifv.trainer.shapes import report

    seen: list[dict[str, Any]] = []

    def fake_evaluate(bundle: Path, **kwargs: Any) -> dict[str, Any]:
        seen.append(kwargs)
        return {"bundle": str(bundle), **kwargs}

    monkeypatch.setattr(report, "evaluate_bundle", fake_evaluate)
    monkeypatch.setattr(report, "render_markdown", lambda result: "table")
    return seen


@pytest.mark.parametrize(
    "args",
    [
        ["eval", "b", "--seeds", "a"],
        ["eval", "b", "--seeds", "0,-1"],
        ["eval", "b", "--images", "0"],
        ["eval", "b", "-n", "0"],
        ["eval", "b", "--threads", "0"],
        ["matrix", "-o", "m", "--seeds", "x"],
        ["matrix", "-o", "m", "--threads", "1,0"],
        ["matrix", "-o", "m", "--eval-seeds", "x"],
        ["matrix", "-o", "m", "--cores", "0"],
    ],
)
def test_demo_mistakes_are_usage_errors_before_any_work(
    args: list[str],
    calls: dict[str, Any],
    evaluated: list[dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--seeds a` was a ValueError traceback, `--images 0` was accepted and `--n 0` refused once the models had
    loaded."""
    from rlaifv.trainer.shapes import matrix

    def no_matrix(*_: Any, **__: Any) -> Any:
        raise AssertionError("cells were started")

    monkeypatch.setattr(matrix, "run_matrix", no_matrix)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["demo", *args])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    flag = [a for a in args if a.startswith("-")][-1]
    assert "Invalid value for '" in result.output and flag in result.output, result.output
    assert not calls and not evaluated and list(tmp_path.iterdir()) == []


def test_demo_eval_short_options(evaluated: list[dict[str, Any]], tmp_path: Path) -> None:
    """`-n` as in `rlaifv eval`, `-o` as in `demo matrix` (`--n` and `--output` still work)."""
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["demo", "eval", "b", "-n", "3", "-o", str(out), "--seeds", "0,4"])
    assert result.exit_code == 0, result.output
    assert evaluated == [{"seeds": [0, 4], "images": 200, "n": 3}] and json.loads(out.read_text())["n"] == 3
    result = CliRunner().invoke(app, ["demo", "eval", "b", "--n", "2", "--output", str(out)])
    assert result.exit_code == 0 and json.loads(out.read_text())["n"] == 2
    bench = CliRunner().invoke(app, ["bench", "reward", "-n", "0"])
    assert bench.exit_code == 2 and "'--n' / '-n'" in bench.output


def test_demo_build_help_says_where_builds_go() -> None:
    """It said "the cache `rlaifv serve` uses"; builds go under `user_cache.cache_root()`."""
    result = CliRunner().invoke(app, ["demo", "build", "--help"], env={"COLUMNS": "200"})
    assert "RLAIFV_CACHE_DIR, else $XDG_CACHE_HOME/rlaifv, else ~/.cache/rlaifv" in result.output
    assert "rlaifv serve" not in result.output


def test_matrix_settings_are_checked_before_any_cell(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--set nope=1` started every cell, each of which failed, and ended in a RuntimeError traceback; it is refused
    as `demo build` refuses it. A cell that fails is one `error:` line naming its log."""
    from rlaifv.trainer.shapes import matrix

    monkeypatch.delenv("RLAIFV_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exited:
        app(["demo", "matrix", "-o", str(tmp_path / "m"), "--seeds", "0,1", "--set", "nope=1"])
    assert exited.value.code == 2 and capsys.readouterr().err == "error: unknown setting(s): nope\n"
    assert not (tmp_path / "m").exists()

    fails = [sys.executable, "-c", "raise SystemExit(3)"]
    monkeypatch.setattr(matrix, "_commands", lambda *args: [fails, fails])
    with pytest.raises(SystemExit) as exited:
        app(["demo", "matrix", "-o", str(tmp_path / "m"), "--seeds", "0", "--threads", "1"])
    log = tmp_path / "m" / "seed0-threads1" / "log.txt"
    assert exited.value.code == 1
    assert capsys.readouterr().err == f"error: cells failed: seed0-threads1 (exit 1, see {log})\n"
