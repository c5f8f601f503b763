"""A built wheel carries the code and the shipped default bundle, and works outside the source tree."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import httpx
import pytest

from rlaifv.testing.server import free_port, wait_until_ready
from rlaifv.trainer.shapes.world import scenes

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


def test_wheel_is_one_package_with_the_default_bundle(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for part in ("rlaifv.json", "shipped.json", "policy/model.safetensors", "reference/model.safetensors"):
        assert f"rlaifv/service/default_bundle/{part}" in names, part
    top = {name.split("/")[0] for name in names}
    assert top == {"rlaifv", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, top
    for module in (
        "rlaifv/reward/model_pair.py",
        "rlaifv/service/app.py",
        "rlaifv/trainer/dpo.py",
        "rlaifv/cli/main.py",
    ):
        assert module in names, module


@pytest.fixture(scope="module")
def fresh_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty venv with the wheel installed; the dependencies come from this environment through a .pth
    (added paths are not scanned for .pth files, so this checkout's editable install stays invisible)."""
    root = tmp_path_factory.mktemp("venv")
    venv.create(root, with_pip=False)
    (site,) = root.glob("lib/python*/site-packages")
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "dependencies.pth").write_text("\n".join(deps) + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(root / "bin" / "python"),
            "install",
            "-q",
            "--no-deps",
            str(wheel),
        ],
        check=True,
    )
    return root


def test_installed_wheel_imports_and_runs_from_anywhere(fresh_venv: Path, tmp_path: Path) -> None:
    code = (
        "import importlib.util, rlaifv.service.app, rlaifv.service.default_model as d, rlaifv.trainer\n"
        "from rlaifv.reward.bundle import read_manifest\n"
        f"assert str(d.default_bundle()).startswith({str(fresh_venv)!r}), d.default_bundle()\n"
        "assert not [m for m in ('reward', 'service', 'trainer') if importlib.util.find_spec(m)]\n"
        "print(read_manifest(d.default_bundle()).name)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    python = str(fresh_venv / "bin" / "python")
    out = subprocess.run([python, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "shapes-rlaifv"
    help_text = subprocess.run(
        [str(fresh_venv / "bin" / "rlaifv"), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert help_text.returncode == 0 and "serve" in help_text.stdout, help_text.stderr


@pytest.mark.integration
def test_installed_wheel_serves_the_shipped_bundle(fresh_venv: Path, tmp_path: Path) -> None:
    """`rlaifv serve` with no bundle, from the installed wheel: the first best-of-N answer from the shipped model."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"RLAIFV_TORCH_THREADS": "1"}
    log = (tmp_path / "server.log").open("w+")
    proc = subprocess.Popen(
        [str(fresh_venv / "bin" / "rlaifv"), "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, proc)
        image = io.BytesIO()
        scenes(7, 1)[0].render().save(image, "PNG")
        body = {
            "images": ["data:image/png;base64," + base64.b64encode(image.getvalue()).decode()],
            "question": "Describe the image.",
            "n": 4,
        }
        response = httpx.post(url + "/v1/best-of-n", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert len(response.json()["candidates"]) == 4
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "shapes-rlaifv"
    finally:
        proc.terminate()
        proc.wait(timeout=60)
