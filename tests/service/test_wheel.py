"""A built wheel carries the code and the shipped default bundle, and works outside the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True,
    )
    (built,) = out.glob("rlaifv-*.whl")
    return built


def test_wheel_ships_the_default_bundle(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for part in ("rlaifv.json", "shipped.json", "policy/model.safetensors", "reference/model.safetensors"):
        assert f"service/default_bundle/{part}" in names, part
    assert not any(name.startswith("tests/") for name in names)


def test_installed_wheel_serves_its_own_bundle_from_anywhere(wheel: Path, tmp_path: Path) -> None:
    """Installed into an empty target (dependencies from this environment), run from outside the checkout."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True
    )
    code = (
        "import service.app, service.default_model as d, reward, json\n"
        "from reward.bundle import read_manifest\n"
        f"assert str(d.default_bundle()).startswith({str(target)!r}), d.default_bundle()\n"
        "print(read_manifest(d.default_bundle()).name)\n"
    )
    env = os.environ | {"PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "shapes-rlaifv"
    help_text = subprocess.run(
        [sys.executable, "-m", "service.cli", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert help_text.returncode == 0 and "serve" in help_text.stdout
