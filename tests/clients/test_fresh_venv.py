"""The SDK installs alone into a fresh virtualenv (httpx and pydantic from the index, nothing else of ours)
and imports and talks to the server there without torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

import pytest

SDK = Path(__file__).resolve().parents[2] / "clients" / "python"

PROBE = """
import importlib.util, json, sys
import rlaifv_client
from rlaifv_client import Client
with Client(base_url=sys.argv[1]) as client:
    health = client.health().status
print(json.dumps({
    "version": rlaifv_client.__version__,
    "health": health,
    "torch_loaded": "torch" in sys.modules,
    "torch_installed": importlib.util.find_spec("torch") is not None,
    "server_installed": any(importlib.util.find_spec(m) is not None for m in ("service", "reward", "fastapi")),
}))
"""


@pytest.mark.slow
def test_sdk_installs_and_imports_alone_in_a_fresh_venv(tmp_path: Path, server: Any) -> None:
    source = tmp_path / "src"
    shutil.copytree(SDK, source, ignore=shutil.ignore_patterns("*.egg-info", "build", "dist", "__pycache__"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = env_dir / ("Scripts" if sys.platform == "win32" else "bin") / "python"
    install = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    frozen = subprocess.run([python, "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout.lower()
    installed = {line.split("==")[0].split(" @ ")[0] for line in frozen.splitlines()}
    assert {"rlaifv-client", "httpx", "pydantic"} <= installed
    assert not installed & {"torch", "transformers", "fastapi", "uvicorn", "rlaifv", "pillow", "numpy"}, installed

    # run outside the repository so nothing of the checkout is importable by accident
    probe = subprocess.run(
        [python, "-I", "-c", PROBE, server.url], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert probe.returncode == 0, probe.stderr
    report = json.loads(probe.stdout)
    assert report == {
        "version": report["version"],
        "health": "ok",
        "torch_loaded": False,
        "torch_installed": False,
        "server_installed": False,
    }
