"""checkov (installed by scripts/deploy-tools into its own venv) passes on every rendered overlay and on both
Dockerfiles, with deploy/.checkov.yaml. Rules skipped globally are there with a reason; rules skipped for one
object are `checkov.io/skipN: RULE=reason` annotations. Outside CI, a missing checkov skips (run scripts/deploy-tools);
in CI it fails."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
import yaml
from deploy_helpers import DEPLOY, MODELS_LOADER, ROOT

CHECKOV = ROOT / ".cache" / "deploy-tools" / "checkov" / "bin" / "checkov"
CONFIG = DEPLOY / ".checkov.yaml"


@pytest.fixture(scope="module")
def checkov() -> str:
    if not CHECKOV.exists():
        if os.environ.get("CI"):
            pytest.fail("checkov is missing: scripts/test runs scripts/deploy-tools before pytest")
        pytest.skip("checkov not installed: run scripts/deploy-tools")
    return str(CHECKOV)


def _run(checkov: str, *args: str) -> list[dict]:
    out = subprocess.run(
        [checkov, "--config-file", str(CONFIG), "--output", "json", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    reports = json.loads(out.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}"
        for r in reports
        for c in r["results"]["failed_checks"]
    ]
    assert out.returncode == 0 and not failed, "\n".join(failed) or out.stderr[-3000:]
    return reports


def test_checkov_passes_on_rendered_manifests(checkov, rendered, tmp_path):
    for overlay, docs in rendered.items():
        (tmp_path / f"{overlay}.yaml").write_text(yaml.safe_dump_all(docs))
    reports = _run(checkov, "--framework", "kubernetes", "--directory", str(tmp_path))
    summary = reports[0]["summary"]
    assert summary["passed"] > 100 and summary["failed"] == 0, summary
    skipped = {c["check_id"] for r in reports for c in r["results"].get("skipped_checks", [])}
    assert skipped <= {"CKV_K8S_8", "CKV_K8S_9", "CKV_K8S_15", "CKV_K8S_35", "CKV_K8S_43"}, skipped


def test_checkov_passes_on_the_models_loader(checkov, tmp_path):
    """deploy/k8s/tools/models-loader.yaml is in no overlay (deploy/README.md applies it by hand): checked apart."""
    (tmp_path / MODELS_LOADER.name).write_text(MODELS_LOADER.read_text())
    reports = _run(checkov, "--framework", "kubernetes", "--directory", str(tmp_path))
    assert reports[0]["summary"]["passed"] > 50, reports[0]["summary"]
    skipped = {c["check_id"] for r in reports for c in r["results"].get("skipped_checks", [])}
    assert skipped <= {"CKV_K8S_8", "CKV_K8S_9"}, skipped


def test_checkov_passes_on_dockerfiles(checkov):
    args = [a for name in ("Dockerfile", "Dockerfile.cpu") for a in ("--file", str(DEPLOY / name))]
    reports = _run(checkov, "--framework", "dockerfile", *args)
    assert reports[0]["summary"]["passed"] > 10


def test_every_skip_says_why(rendered):
    for line in CONFIG.read_text().splitlines():
        if re.match(r"\s*- CKV", line):
            assert re.search(r"#\s*\S.{20,}", line), f"deploy/.checkov.yaml: no reason: {line}"
    loader = [doc for doc in yaml.safe_load_all(MODELS_LOADER.read_text()) if doc]
    for docs in [*rendered.values(), loader]:
        for doc in docs:
            for key, value in doc["metadata"].get("annotations", {}).items():
                if key.startswith("checkov.io/skip"):
                    assert re.fullmatch(r"CKV2?_\w+=\S.{20,}", value), f"{doc['metadata']['name']}: {key}: {value}"
