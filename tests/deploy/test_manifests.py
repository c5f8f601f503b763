"""What the rendered overlays of deploy/k8s promise: the settings they set exist and parse, the probes hit real
routes on the configured port, shutdown fits in the grace period, pods are locked down, GPUs, models, secrets,
Redis, the worker, autoscaling and network policies are wired to each other. Rendering: tests/deploy/conftest.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import (
    GPU_OVERLAYS,
    K8S,
    OVERLAYS,
    VLLM_OVERLAYS,
    container_env,
    find,
    matches,
    one,
    pod_spec,
    vllm_containers,
    workloads,
)
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from rlaifv.service.app import create_app
from rlaifv.service.default_model import default_bundle
from rlaifv.service.settings import Settings
from rlaifv.testing.server import free_port

SETTINGS_ENV = {f"RLAIFV_{name.upper()}" for name in Settings.model_fields}
# Env names the pods set that are not Settings fields, and why.
OTHER_ENV: dict[str, str] = {}
OUR_CONTAINERS = {"server", "worker"}
# Ideas of "long enough" for the startup probe: a GPU pod loads a 7B pair from network storage.
STARTUP_BUDGET_S = {"gpu": 600, "cpu": 120}


def _containers(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) of the server and the worker, which run our image."""
    return [(w, c) for w in workloads(docs) for c in pod_spec(w)["containers"] if c["name"] in OUR_CONTAINERS]


def _server(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    (pair,) = [(w, c) for w, c in _containers(docs) if c["name"] == "server"]
    return pair


def test_every_kustomization_lists_existing_files_and_every_component_is_used(rendered):
    used = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        for entry in spec.get("resources", []) + spec.get("components", []):
            assert (kustomization.parent / entry).exists(), f"{kustomization}: {entry}"
        used |= {(kustomization.parent / c).resolve() for c in spec.get("components", [])}
    components = {p.parent.resolve() for p in (K8S / "components").glob("*/kustomization.yaml")}
    assert components <= used, f"components no overlay uses (so never rendered here): {components - used}"
    assert set(rendered) == set(OVERLAYS)


CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_lands_in_the_overlays_namespace_with_the_projects_label(rendered, overlay):
    """An object without a namespace goes wherever kubectl points (an HPA there scales nothing)."""
    docs = rendered[overlay]
    (namespace,) = [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"]
    for doc in docs:
        meta = doc["metadata"]
        if doc["kind"] not in CLUSTER_SCOPED:
            assert meta.get("namespace") == namespace, f"{overlay}: {doc['kind']}/{meta['name']}"
        assert meta.get("labels", {}).get("app.kubernetes.io/part-of") == "rlaifv", f"{doc['kind']}/{meta['name']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_env_names_are_settings_and_values_parse(rendered, overlay, tmp_path, monkeypatch):
    docs = rendered[overlay]
    configmap = one(docs, "ConfigMap", "rlaifv")
    unknown = sorted(set(configmap["data"]) - SETTINGS_ENV)
    assert not unknown, f"{overlay}: ConfigMap names unknown to Settings: {unknown}"
    for workload, container in _containers(docs):
        env = container_env(docs, container)
        names = list(env)
        unknown = sorted(n for n in names if n not in SETTINGS_ENV and n not in OTHER_ENV)
        assert not unknown, f"{overlay} {workload['metadata']['name']}: not Settings fields: {unknown}"
        defined: list[str] = []
        for item in container.get("env", []):  # $(VAR) only expands names defined earlier in env
            for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", item.get("value", "")):
                assert ref in defined, f"{overlay}: {item['name']} uses $({ref}) before it is defined"
            defined.append(item["name"])
        # The values parse as Settings (the API-keys file and the password are stand-ins for the mounted secrets).
        keys = tmp_path / "keys"
        keys.write_text("# one key per line\nk8s-test-key-0123456789\n")
        for name in [n for n in os.environ if n.startswith("RLAIFV_")]:
            monkeypatch.delenv(name)
        for name, value in env.items():
            value = value if value is not None else "any pass:word/@#"  # from the Secret: any characters
            monkeypatch.setenv(name, str(keys) if name == "RLAIFV_API_KEYS_FILE" else value)
        settings = Settings()
        assert settings.load_api_keys() == ["k8s-test-key-0123456789"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_hit_the_app_routes_on_the_configured_port(rendered, overlay):
    docs = rendered[overlay]
    workload, container = _server(docs)
    env = container_env(docs, container)
    port = int(env.get("RLAIFV_PORT") or Settings.model_fields["port"].default)
    (http,) = [p for p in container["ports"] if p["name"] == "http"]
    assert http["containerPort"] == port
    assert container["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert env["RLAIFV_HOST"] == "0.0.0.0", "the pod must listen beyond loopback"
    service = one(docs, "Service", "rlaifv")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    assert matches({"matchLabels": service["spec"]["selector"]}, workload["spec"]["template"]["metadata"]["labels"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_probes_hit_its_operations_port(rendered, overlay):
    docs = rendered[overlay]
    (workload, worker), *_ = [(w, c) for w, c in _containers(docs) if c["name"] == "worker"]
    env = container_env(docs, worker)
    port = int(env.get("RLAIFV_WORKER_PORT") or Settings.model_fields["worker_port"].default)
    (ops,) = worker["ports"]
    assert (ops["name"], ops["containerPort"]) == ("metrics", port)
    assert worker["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert env["RLAIFV_HOST"] == "0.0.0.0", "the kubelet probes the pod's address, not its loopback"
    service = one(docs, "Service", "rlaifv-worker")
    assert service["spec"]["clusterIP"] == "None" and [p["targetPort"] for p in service["spec"]["ports"]] == ["metrics"]
    assert matches({"matchLabels": service["spec"]["selector"]}, workload["spec"]["template"]["metadata"]["labels"])
    (policy,) = [p for p in find(docs, "NetworkPolicy") if p["metadata"]["name"] == "rlaifv-worker"]
    assert [port for rule in policy["spec"]["ingress"] for port in rule["ports"]] == [{"port": port, "protocol": "TCP"}]


def test_probe_routes_answer_as_the_probes_expect():
    """Before the lifespan has loaded a model, /healthz is alive and /readyz is not ready; /metrics exists. The
    worker's operations app answers the same way before its model loads."""
    from rlaifv.service.app import create_worker_app
    from rlaifv.service.metrics import Metrics

    settings = Settings(bundle=default_bundle())
    for app in (create_app(settings), create_worker_app(settings, Metrics())):
        client = TestClient(app)  # no `with`: the lifespan (model load) does not run
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
        assert client.get("/metrics").status_code == 200


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_startup_probe_covers_model_loading(rendered, overlay):
    docs = rendered[overlay]
    for _, container in _containers(docs):  # the server and the worker load the same pair
        name = f"{overlay} {container['name']}"
        probe = container["startupProbe"]
        budget = probe["periodSeconds"] * probe["failureThreshold"]
        assert budget >= STARTUP_BUDGET_S["gpu" if overlay in GPU_OVERLAYS else "cpu"], f"{name}: {budget} s"
        # The vllm engine waits up to RLAIFV_VLLM_WAIT_S for its servers before it warms up.
        env = container_env(docs, container)
        if env.get("RLAIFV_ENGINE") == "vllm":
            wait = float(env.get("RLAIFV_VLLM_WAIT_S") or Settings.model_fields["vllm_wait_s"].default)
            assert budget >= wait + 60, f"{name}: startup budget {budget} s < RLAIFV_VLLM_WAIT_S {wait} s + 60 s"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_outlasts_the_drain(rendered, overlay):
    docs = rendered[overlay]
    for workload, container in _containers(docs):
        env = container_env(docs, container)
        drain = float(env.get("RLAIFV_SHUTDOWN_GRACE_S") or Settings.model_fields["shutdown_grace_s"].default)
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        sleep = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
        grace = pod_spec(workload)["terminationGracePeriodSeconds"]
        assert grace >= sleep + drain + 5, f"{overlay} {workload['metadata']['name']}: {grace} < {sleep} + {drain} + 5"
        deadline = float(env.get("RLAIFV_REQUEST_TIMEOUT_S") or Settings.model_fields["request_timeout_s"].default)
        assert drain >= deadline, f"{overlay}: a {drain} s drain cuts requests accepted with {deadline} s to run"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_locked_down(rendered, overlay):
    for workload in workloads(rendered[overlay]):
        name = workload["metadata"]["name"]
        pod = pod_spec(workload)
        assert pod["automountServiceAccountToken"] is False, name
        # Service links would put FOO_PORT=tcp://... into the environment: Service `rlaifv` gives RLAIFV_PORT (a
        # Settings name), a Service named `vllm` VLLM_PORT (which vLLM refuses).
        assert pod["enableServiceLinks"] is False, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] >= 10000, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        mounts_by_volume = {v["name"]: v for v in pod["volumes"]}
        for container in pod.get("initContainers", []) + pod["containers"]:
            where = f"{overlay} {name}/{container['name']}"
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc.get("privileged") is False, where
            assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{where}: {kind}"
            # With a read-only root, /tmp must be a volume.
            assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"]), where
            for mount in container["volumeMounts"]:
                assert mount["name"] in mounts_by_volume or mount["name"] in {
                    t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])
                }, where
        for volume in pod["volumes"]:  # a runaway writer must not fill the node's disk (or memory, for Memory)
            if "emptyDir" in volume:
                assert volume["emptyDir"].get("sizeLimit"), f"{overlay} {name}: emptyDir {volume['name']}"


def test_image_cache_paths_are_mounted_writable(rendered):
    """HOME, HF_HOME and XDG_CACHE_HOME (set in the images) lie on an emptyDir mount of every rlaifv container."""
    cache_env = {}
    for dockerfile in ("Dockerfile", "Dockerfile.cpu"):
        text = (K8S.parent / dockerfile).read_text()
        cache_env.update(dict(re.findall(r"\b(HOME|HF_HOME|XDG_CACHE_HOME)=(\S+)", text)))
    assert set(cache_env) == {"HOME", "HF_HOME", "XDG_CACHE_HOME"}
    for overlay, docs in rendered.items():
        for workload, container in _containers(docs):
            volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
            writable = [
                m["mountPath"]
                for m in container["volumeMounts"]
                if not m.get("readOnly") and "emptyDir" in volumes[m["name"]]
            ]
            for name, path in cache_env.items():
                assert any(Path(path).is_relative_to(w) for w in writable), f"{overlay}: {name}={path} not writable"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_resources_and_scheduling(rendered, overlay):
    """One GPU, GPU nodes only, for every pod that runs a model: ours with the transformers engine on the gpu
    overlays, the vLLM servers; none for ours in front of vLLM (they only tokenize) or on the CPU overlays. The GPU
    request is what keeps a pod on GPU nodes: no node label is required, as nvidia.com/gpu.present is set only by
    the NVIDIA GPU Operator (with the device plugin alone, or on managed GPU pools, such a pod stays Pending)."""
    docs = rendered[overlay]
    assert bool(vllm_containers(docs)) == (overlay in VLLM_OVERLAYS)
    for workload, container in _containers(docs) + vllm_containers(docs):
        pod = pod_spec(workload)
        env = container_env(docs, container)
        ours = container["name"] in OUR_CONTAINERS
        if ours:
            assert env["RLAIFV_ENGINE"] == ("vllm" if overlay in VLLM_OVERLAYS else "transformers"), overlay
        if not ours or (overlay in GPU_OVERLAYS and env["RLAIFV_ENGINE"] == "transformers"):
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
            assert "nvidia.com/gpu.present" not in str(pod.get("nodeSelector", {})) + str(pod.get("affinity", {}))
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            if ours:
                assert env["RLAIFV_DEVICE"] == "cuda"
        else:
            assert "nvidia.com/gpu" not in str(pod)
            assert env["RLAIFV_DEVICE"] == "cpu"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_model_weights_come_from_a_volume_never_the_image(rendered, overlay):
    docs = rendered[overlay]
    for workload, container in _containers(docs):
        env = container_env(docs, container)
        pod = pod_spec(workload)
        if overlay not in GPU_OVERLAYS:  # the CPU image serves the shapes bundle inside the package
            assert "RLAIFV_BUNDLE" not in env
            assert not find(docs, "PersistentVolumeClaim")
            continue
        bundle = Path(env["RLAIFV_BUNDLE"])
        (mount,) = [m for m in container["volumeMounts"] if bundle.is_relative_to(m["mountPath"])]
        assert mount["readOnly"] is True
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        if "persistentVolumeClaim" in volume:
            claim = one(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
            # Shared by replicas; ReadOnlyMany could not be filled (a new volume is empty, mounted read-only).
            assert claim["spec"]["accessModes"] == ["ReadWriteMany"], overlay
        else:  # components/model-from-object-storage: an init container fills an emptyDir first
            assert "emptyDir" in volume
            (fetch,) = pod["initContainers"]
            assert str(bundle) in " ".join(fetch["command"])
            assert any(m["name"] == volume["name"] and not m.get("readOnly") for m in fetch["volumeMounts"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_referenced_never_shipped(rendered, overlay):
    docs = rendered[overlay]
    assert not find(docs, "Secret"), (
        "secrets are created by the platform team (deploy/README.md), never applied from git"
    )
    for workload, container in _containers(docs):
        env = container_env(docs, container)
        (password,) = [e for e in container["env"] if e["name"] == "RLAIFV_REDIS_PASSWORD"]
        assert password["valueFrom"]["secretKeyRef"] == {"name": "rlaifv-redis", "key": "password"}
        assert "@" not in env["RLAIFV_REDIS_URL"]  # the password never sits in the URL
        if "RLAIFV_API_KEYS_FILE" in env:  # every container Settings reads it in (the worker crashed without it)
            keys = Path(env["RLAIFV_API_KEYS_FILE"])
            mounts = [m for m in container["volumeMounts"] if m["mountPath"] == str(keys.parent)]
            assert len(mounts) == 1, f"{overlay} {container['name']}: {keys} is not mounted"
            (volume,) = [v for v in pod_spec(workload)["volumes"] if v["name"] == mounts[0]["name"]]
            assert volume["secret"]["secretName"] == "rlaifv-api-keys"
    redis = one(docs, "StatefulSet", "rlaifv-redis")
    volumes = pod_spec(redis)["volumes"]
    assert {"name": "redis-password", "secret": {"secretName": "rlaifv-redis", "defaultMode": 0o440}} in volumes


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_is_persistent_and_is_what_the_pods_use(rendered, overlay):
    docs = rendered[overlay]
    redis = one(docs, "StatefulSet", "rlaifv-redis")
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    (container,) = pod_spec(redis)["containers"]
    assert any(m["name"] == claim["metadata"]["name"] and m["mountPath"] == "/data" for m in container["volumeMounts"])
    command = " ".join(container["command"] + container["args"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    service = one(docs, "Service", "rlaifv-redis")
    port = service["spec"]["ports"][0]["port"]
    assert matches({"matchLabels": service["spec"]["selector"]}, redis["spec"]["template"]["metadata"]["labels"])
    for _, ours in _containers(docs):
        url = container_env(docs, ours)["RLAIFV_REDIS_URL"]
        assert re.fullmatch(rf"redis://rlaifv-redis:{port}/\d+", url), url


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_runs_jobs_and_the_server_does_not(rendered, overlay):
    docs = rendered[overlay]
    by_name = {c["name"]: (w, c) for w, c in _containers(docs)}
    server, worker = by_name["server"][1], by_name["worker"][1]
    assert server["command"] == ["rlaifv", "serve"]
    assert worker["command"] == ["rlaifv", "worker"]
    assert container_env(docs, server)["RLAIFV_JOBS_WORKERS"] == "0"
    assert int(container_env(docs, worker)["RLAIFV_JOBS_WORKERS"] or 1) >= 1
    assert server["image"] == worker["image"]


def test_the_pods_commands_exist():
    from rlaifv.cli.main import app

    for command in ("serve", "worker"):
        result = CliRunner().invoke(app, [command, "--help"])
        assert result.exit_code == 0, f"rlaifv {command}: {result.output}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies(rendered, overlay):
    docs = rendered[overlay]
    pods = {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in workloads(docs)}
    policies = find(docs, "NetworkPolicy")
    for name, labels in pods.items():
        assert any(matches(p["spec"]["podSelector"], labels) for p in policies), f"{name} has no NetworkPolicy"
    redis_labels = pods["rlaifv-redis"]
    (redis_policy,) = [p for p in policies if matches(p["spec"]["podSelector"], redis_labels)]
    allowed = set()
    for rule in redis_policy["spec"]["ingress"]:
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, "no namespace or IP peers: only our own pods"
            allowed |= {name for name, labels in pods.items() if matches(peer["podSelector"], labels)}
    assert allowed == {"rlaifv", "rlaifv-worker"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pdb_lets_drains_evict_unready_pods(rendered, overlay):
    """With the default policy (IfHealthyBudget) an unready pod (loading, crash-looping, or all of ours while vLLM
    is rescheduled) is evicted only while the budget has room, which unready pods themselves use up: a node drain
    then waits forever. AlwaysAllow lets them go (policy/v1: beta and on by default since 1.27, GA in 1.31)."""
    docs = rendered[overlay]
    pdbs = find(docs, "PodDisruptionBudget")
    assert pdbs
    pods = [w["spec"]["template"]["metadata"]["labels"] for w in workloads(docs)]
    for pdb in pdbs:
        name = f"{overlay}: {pdb['metadata']['name']}"
        assert pdb["spec"].get("unhealthyPodEvictionPolicy") == "AlwaysAllow", name
        assert any(matches(pdb["spec"]["selector"], labels) for labels in pods), f"{name} selects no pods"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaling_disruption_and_monitoring(rendered, overlay):
    docs = rendered[overlay]
    server, _ = _server(docs)
    labels = server["spec"]["template"]["metadata"]["labels"]
    (pdb,) = [p for p in find(docs, "PodDisruptionBudget") if matches(p["spec"]["selector"], labels)]
    assert pdb["spec"]["maxUnavailable"] == 1
    scalers = find(docs, "ScaledObject") + find(docs, "HorizontalPodAutoscaler")
    if overlay not in GPU_OVERLAYS:
        assert not scalers and server["spec"]["replicas"] == 1
        return
    targets = [s["spec"]["scaleTargetRef"]["name"] for s in scalers]
    assert sorted(targets) == sorted(set(targets)), "never two scalers of one Deployment: they would fight"
    if find(docs, "HorizontalPodAutoscaler"):  # the overlay for clusters without KEDA: one unknown kind fails apply
        assert not find(docs, "ScaledObject")
    (scaler,) = [s for s in scalers if s["spec"]["scaleTargetRef"]["name"] == "rlaifv"]
    assert scaler["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "rlaifv"}
    assert "replicas" not in server["spec"], "the autoscaler owns the replica count"
    queries = str(scaler["spec"])
    assert "rlaifv_queue_depth" in queries
    metrics = create_app(Settings(bundle=default_bundle())).state.metrics
    assert metrics.queue_depth._name == "rlaifv_queue_depth"
    worker = one(docs, "Deployment", "rlaifv-worker")
    if "rlaifv-worker" in targets:  # KEDA scales the workers on the job backlog, and owns their replica count
        (by_backlog,) = [s for s in scalers if s["spec"]["scaleTargetRef"]["name"] == "rlaifv-worker"]
        assert "max(rlaifv_jobs_backlog" in str(by_backlog["spec"]) and "replicas" not in worker["spec"]
        assert metrics.jobs_backlog._name == "rlaifv_jobs_backlog"
    else:
        assert worker["spec"]["replicas"] == 1  # scaled by hand (deploy/README.md)
    monitors = find(docs, "ServiceMonitor")
    assert len(monitors) == 2
    for name in ("rlaifv", "rlaifv-worker"):  # the server's and the workers' metrics
        service = one(docs, "Service", name)
        (monitor,) = [m for m in monitors if matches(m["spec"]["selector"], service["metadata"]["labels"])]
        ports = {p["name"] for p in service["spec"]["ports"]}
        assert all(e["port"] in ports and e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])


def _redis_scripts(docs: list[dict[str, Any]]) -> tuple[str, str]:
    (container,) = pod_spec(one(docs, "StatefulSet", "rlaifv-redis"))["containers"]
    assert container["command"] == ["sh", "-c"]
    (start,) = container["args"]
    probe = container["readinessProbe"]["exec"]["command"]
    assert probe[:2] == ["sh", "-c"]
    return start, probe[2]


@pytest.mark.skipif(not (shutil.which("redis-server") and shutil.which("od")), reason="needs redis-server and od")
def test_redis_starts_with_the_secrets_password_byte_for_byte_and_never_in_its_argv(rendered, tmp_path):
    """The Redis container's own start-up and readiness scripts, run by sh against a local redis-server: a
    password of any characters (quotes, backslash, `$`, spaces, a trailing newline as `--from-file` leaves)
    is what a client holding the same bytes (RLAIFV_REDIS_PASSWORD) authenticates with; it is never in
    /proc/PID/cmdline (it was `--requirepass "$(cat ...)"`, and `$(...)` also dropped the newline); an empty
    Secret is refused."""
    import redis

    scripts = {_redis_scripts(docs) for docs in rendered.values()}
    assert len(scripts) == 1, "the overlays run different Redis scripts: test each"
    ((start, probe),) = scripts
    password = "p \"a\\s's $w0rd\tx\n"
    secret = tmp_path / "password"
    port = free_port()

    def local(script: str) -> str:
        assert "/secrets/redis/password" in script
        script = script.replace("/secrets/redis/password", str(secret)).replace("--dir /data", f"--dir {tmp_path}")
        script = script.replace("redis-server ", f"redis-server --port {port} --bind 127.0.0.1 ")
        return script.replace("redis-cli ", f"redis-cli -p {port} ")

    secret.write_text("")
    empty = subprocess.run(["sh", "-c", local(start)], capture_output=True, text=True, timeout=30)
    assert empty.returncode != 0 and "password is empty" in empty.stderr

    secret.write_text(password)
    proc = subprocess.Popen(["sh", "-c", local(start)], stdout=subprocess.DEVNULL, cwd=tmp_path)
    try:
        client = redis.Redis(port=port, password=password, socket_timeout=5)
        deadline = time.monotonic() + 20
        while True:
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None, "redis-server exited"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, password=password.rstrip("\n")).ping()
        assert subprocess.run(["sh", "-c", local(probe)], timeout=30).returncode == 0
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert b"redis-server" in cmdline and b"w0rd" not in cmdline
    finally:
        proc.terminate()
        proc.wait(timeout=30)
