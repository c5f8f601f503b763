"""The default model is the bundle shipped in the package; without it the service says how to get one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import rlaifv.service.default_model as default_model

ROOT = Path(__file__).resolve().parents[2]


def test_missing_shipped_bundle_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(default_model, "SHIPPED_BUNDLE", tmp_path / "absent")
    with pytest.raises(default_model.MissingDefaultBundle, match="rlaifv demo build --ship"):
        default_model.default_bundle()


def test_serve_without_a_bundle_fails_in_one_line_when_none_ships(tmp_path: Path) -> None:
    code = (
        "import sys, pathlib, rlaifv.service.default_model as d\n"
        f"d.SHIPPED_BUNDLE = pathlib.Path({str(tmp_path / 'absent')!r})\n"
        "from rlaifv.cli.main import app\n"
        "sys.argv = ['rlaifv', 'serve']\n"
        "app()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "error: no default bundle" in out.stderr and "Traceback" not in out.stderr
