"""The Kubernetes manifests use the same setting names as the code, and probe real routes."""

from pathlib import Path

import yaml

from rlaifv.service.settings import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def test_configmap_names_are_settings():
    (configmap,) = _docs("configmap.yaml")
    fields = {f"RLAIFV_{name.upper()}" for name in Settings.model_fields}
    unknown = sorted(set(configmap["data"]) - fields)
    assert not unknown, f"configmap names unknown to service.settings.Settings: {unknown}"


def test_probes_hit_health_routes_and_grace_outlasts_shutdown():
    (deployment,) = _docs("deployment.yaml")
    spec = deployment["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    (configmap,) = _docs("configmap.yaml")
    assert spec["terminationGracePeriodSeconds"] > float(configmap["data"]["RLAIFV_SHUTDOWN_GRACE_S"])


def test_kustomization_lists_existing_files():
    (kustomization,) = _docs("kustomization.yaml")
    for resource in kustomization["resources"]:
        assert (DEPLOY / resource).is_file(), resource
