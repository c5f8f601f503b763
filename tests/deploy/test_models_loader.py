"""deploy/k8s/tools/models-loader.yaml, the helper pod that fills the model PVC (deploy/README.md "Install"):
applied by hand, never by an overlay; it mounts the overlays' claim read-write, meets Pod Security "restricted"
(which the namespace enforces), validates against the Kubernetes schemas, gets no network, and the README's
commands name it. checkov runs on it in test_checkov.py."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploy_helpers import DEPLOY, K8S, K8S_VERSIONS, MODELS_LOADER, ROOT, find, matches, workloads


@pytest.fixture(scope="module")
def loader() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(MODELS_LOADER.read_text()) if doc]


def _pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (pod,) = find(docs, "Pod")
    return pod


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_validates(loader, version):
    for doc in loader:
        kubernetes_validate.validate(doc, version, strict=True)


def test_no_kustomization_applies_it(loader, rendered):
    """Applied by hand: a model pod never starts beside a writer, and `kubectl apply -k` never recreates it."""
    for kustomization in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        entries = spec.get("resources", []) + spec.get("components", [])
        entries += [patch["path"] for patch in spec.get("patches", []) if "path" in patch]
        for entry in entries:
            target = (kustomization.parent / entry).resolve()
            assert not MODELS_LOADER.resolve().is_relative_to(target), f"{kustomization}: {entry}"
    names = {(d["kind"], d["metadata"]["name"]) for d in loader}
    for overlay, docs in rendered.items():
        assert not names & {(d["kind"], d["metadata"]["name"]) for d in docs}, overlay


def test_mounts_the_overlays_model_claim_writable(loader, rendered):
    pod = _pod(loader)
    spec = pod["spec"]
    (volume,) = spec["volumes"]
    claim = volume["persistentVolumeClaim"]
    assert not claim.get("readOnly")
    overlays = {name: docs for name, docs in rendered.items() if find(docs, "PersistentVolumeClaim")}
    assert {"gpu", "gpu-vllm"} <= set(overlays)
    for name, docs in overlays.items():
        (pvc,) = find(docs, "PersistentVolumeClaim")
        assert pvc["metadata"]["name"] == claim["claimName"], name
        assert pvc["metadata"]["namespace"] == pod["metadata"]["namespace"], name
        assert "ReadWriteMany" in pvc["spec"]["accessModes"], name
    (container,) = spec["containers"]
    (mount,) = container["volumeMounts"]
    assert mount["name"] == volume["name"] and mount["mountPath"] == "/models" and not mount.get("readOnly")
    # The bundle lands where the overlays read it: RLAIFV_BUNDLE=/models/bundle.
    for docs in overlays.values():
        (configmap,) = [d for d in find(docs, "ConfigMap") if d["metadata"]["name"] == "rlaifv"]
        assert configmap["data"]["RLAIFV_BUNDLE"] == "/models/bundle"


def test_meets_pod_security_restricted(loader):
    pod = _pod(loader)
    spec = pod["spec"]
    sc = spec["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
    assert spec["restartPolicy"] == "Never"
    assert not {"hostNetwork", "hostPID", "hostIPC", "initContainers"} & set(spec)
    (container,) = spec["containers"]
    csc = container["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False and csc["privileged"] is False
    assert csc["readOnlyRootFilesystem"] is True and csc["runAsNonRoot"] is True
    assert csc["capabilities"] == {"drop": ["ALL"]}
    image, _, tag = container["image"].partition(":")
    assert image == "busybox" and tag[:1].isdigit(), f"a pinned version tag: {container['image']}"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory", "ephemeral-storage"} <= set(container["resources"][kind]), kind


def test_gets_no_network_and_nothing_else_selects_it(loader, rendered):
    """kubectl cp streams through the API server: the pod needs no network. No Service, PDB or NetworkPolicy of
    the overlays selects it, and its own policy selects none of their pods."""
    labels = _pod(loader)["metadata"]["labels"]
    (policy,) = find(loader, "NetworkPolicy")
    assert matches(policy["spec"]["podSelector"], labels)
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert not policy["spec"].get("ingress") and not policy["spec"].get("egress")
    for overlay, docs in rendered.items():
        for w in workloads(docs):
            assert not matches(policy["spec"]["podSelector"], w["spec"]["template"]["metadata"]["labels"]), overlay
        for doc in find(docs, "Service") + find(docs, "PodDisruptionBudget") + find(docs, "NetworkPolicy"):
            selector = doc["spec"].get("podSelector", doc["spec"].get("selector"))
            if doc["kind"] == "Service":  # plain labels, or none (no pods selected)
                selector = {"matchLabels": selector} if selector else None
            where = f"{overlay}: {doc['kind']}/{doc['metadata']['name']}"
            assert selector is None or not matches(selector, labels), where


def test_readme_shows_how_to_use_it(loader):
    readme = (DEPLOY / "README.md").read_text()
    pod = _pod(loader)["metadata"]["name"]
    path = MODELS_LOADER.relative_to(ROOT)
    for command in (
        f"kubectl -n rlaifv apply -f {path}",
        f"kubectl -n rlaifv wait --for=condition=Ready pod/{pod}",
        f"kubectl -n rlaifv cp ./bundle {pod}:/models/bundle",
        f"kubectl -n rlaifv delete -f {path}",
    ):
        assert command in readme, command
