"""Every rendered object validates against the Kubernetes JSON schemas (kubernetes-validate, bundled offline,
strict: unknown fields fail) of the newest release it knows and of the oldest one we support, and every custom
resource against its schema in deploy/schemas/ (hand-written, see deploy/schemas/README.md)."""

from __future__ import annotations

import json
import socket
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from deploy_helpers import DEPLOY, K8S_VERSIONS, OVERLAYS

VERSIONS = K8S_VERSIONS
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring.coreos.com-v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda.sh-v1alpha1.json",
}


def _crd_validator(doc: dict[str, Any]) -> jsonschema.Draft202012Validator | None:
    name = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if name is None:
        return None
    schema = json.loads((DEPLOY / "schemas" / name).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture
def offline(monkeypatch):
    """Schemas must come from the installed package: any network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("schema validation tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_latest_release_is_current():
    major, minor, _ = (int(x) for x in kubernetes_validate.latest_version().split("."))
    assert (major, minor) >= (1, 33), "update kubernetes-validate (pyproject.toml dev extra) to a current release"


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", VERSIONS)
def test_objects_validate(rendered, overlay, version, offline):
    checked = 0
    for doc in rendered[overlay]:
        where = f"{overlay}: {doc['kind']} {doc['metadata']['name']}"
        validator = _crd_validator(doc)
        if validator is not None:
            errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
            assert not errors, f"{where}: {errors}"
        else:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                pytest.fail(f"{where}: {doc['apiVersion']} has no schema in {version} and none in deploy/schemas")
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where} is invalid for Kubernetes {version}: {exc.message} at {list(exc.path)}")
        checked += 1
    assert checked == len(rendered[overlay]) > 5


def test_validation_is_strict(rendered):
    """A misspelt field fails, in a built-in kind and in each custom resource."""
    docs = {d["kind"]: d for overlay in rendered.values() for d in overlay}
    deployment = json.loads(json.dumps(docs["Deployment"]))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)
    for kind in ("ServiceMonitor", "ScaledObject"):
        bad = json.loads(json.dumps(docs[kind]))
        bad["spec"]["selectr" if kind == "ServiceMonitor" else "maxReplicas"] = 1
        assert list(_crd_validator(bad).iter_errors(bad)), kind
    scaled = json.loads(json.dumps(docs["ScaledObject"]))
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 4  # KEDA wants strings
    assert list(_crd_validator(scaled).iter_errors(scaled))
    rules = docs["PrometheusRule"]
    for mistake in ({"fro": "5m"}, {"for": "five minutes"}, {"record": "x"}, {"labels": {"severity": 1}}):
        bad = json.loads(json.dumps(rules))
        bad["spec"]["groups"][0]["rules"][0].update(mistake)
        assert list(_crd_validator(bad).iter_errors(bad)), mistake
