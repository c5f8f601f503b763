"""The vLLM overlays (gpu-vllm): our server and worker run RLAIFV_ENGINE=vllm in front of two vLLM servers from the
official image, the bundle's policy and reference (docs/vllm.md). Their URLs reach the vLLM Services' ports and
pods, the vLLM args carry what the engine needs and parse with the vLLM release CI runs (scripts/vllm-env), one
Secret keys both sides, the weights are the bundle's folders on our read-only volume, the vLLM pods have writable
caches on a read-only root, and only our pods reach them. The checks every pod gets (security context, GPUs,
schemas, checkov) are in test_manifests.py, test_schemas.py and test_checkov.py."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from deploy_helpers import (
    VLLM_OVERLAYS,
    VLLM_VERSION,
    container_env,
    find,
    matches,
    one,
    pod_spec,
    vllm_containers,
    workloads,
)

from rlaifv.service.engines.vllm import api_root
from rlaifv.service.protocol import MAX_TOP_LOGPROBS
from rlaifv.service.settings import Settings
from rlaifv.testing.vllm_server import vllm_python

ROLES = ("policy", "reference")
OURS = ("rlaifv", "rlaifv-worker")
# The vLLM servers' own environment: set by us for a read-only root, or read by vLLM, Hugging Face, Triton.
CACHE_ENV = ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "HF_HOME")
# Time allowed for pulling the vLLM image (several GB) onto a node before its startup budget starts counting.
IMAGE_PULL_S = 600

pytestmark = pytest.mark.parametrize("overlay", VLLM_OVERLAYS)


def _ours(docs: list[dict[str, Any]]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Deployment name -> (Deployment, container) of our server and worker."""
    return {
        name: (one(docs, "Deployment", name), pod_spec(one(docs, "Deployment", name))["containers"][0]) for name in OURS
    }


def _flags(args: list[str]) -> tuple[list[str], dict[str, str | bool]]:
    """(positionals, {flag: value}) of `vllm serve` args written as the manifests write them: `--flag=value`, or a
    bare `--flag` for a switch. (test_vllm_args_parse_with_the_vllm_ci_runs runs vLLM's own parser on them.)"""
    positionals: list[str] = []
    flags: dict[str, str | bool] = {}
    for arg in args:
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            assert name not in flags, f"{name} given twice"
            flags[name] = value if eq else True
        else:
            positionals.append(arg)
    return positionals, flags


def _servers(docs: list[dict[str, Any]]) -> dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """role -> (Service, Deployment, container) of the vLLM server that RLAIFV_VLLM_<ROLE>_URL reaches: the Service
    named by the URL's host, and the one Deployment whose pods that Service selects."""
    _, server = _ours(docs)["rlaifv"]
    env = container_env(docs, server)
    namespace = one(docs, "ConfigMap", "rlaifv")["metadata"].get("namespace")
    out = {}
    for role in ROLES:
        url = urlsplit(env[f"RLAIFV_VLLM_{role.upper()}_URL"] or "")
        assert url.scheme == "http" and url.port, f"{role}: {url.geturl()} (plain HTTP inside the namespace, a port)"
        assert url.path in ("", "/v1", "/v1/"), f"{role}: {url.geturl()}: the OpenAI API root (api_root)"
        name, _, rest = (url.hostname or "").partition(".")
        assert rest in ("", namespace, f"{namespace}.svc", f"{namespace}.svc.cluster.local"), url.hostname
        service = one(docs, "Service", name)
        (port,) = [p for p in service["spec"]["ports"] if p["port"] == url.port]
        selected = [
            w
            for w in workloads(docs)
            if matches({"matchLabels": service["spec"]["selector"]}, w["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(selected) == 1, f"Service {name} selects {[w['metadata']['name'] for w in selected]}"
        (container,) = [c for c in pod_spec(selected[0])["containers"] if c["name"] == "vllm"]
        (target,) = [p for p in container["ports"] if port["targetPort"] in (p["name"], p["containerPort"])]
        assert target["protocol"] == port.get("protocol", "TCP") == "TCP"
        out[role] = (service, selected[0], container)
    return out


def test_the_urls_reach_the_vllm_services_ports_and_pods(rendered, overlay):
    docs = rendered[overlay]
    servers = _servers(docs)
    assert {d["metadata"]["name"] for _, d, _ in servers.values()} == {
        w["metadata"]["name"] for w, _ in vllm_containers(docs)
    }, "two distinct vLLM Deployments, both reached"
    for role, (service, _, container) in servers.items():
        (port,) = [p for p in container["ports"] if p["name"] == "http"]
        _, flags = _flags(container["args"])
        assert int(flags["--port"]) == port["containerPort"], f"{role}: vLLM listens where the Service sends"
        assert flags["--host"] == "0.0.0.0", role
        assert service["metadata"]["name"] == f"rlaifv-vllm-{role}"
    # The worker runs the same engine against the same servers (one ConfigMap, nothing overridden).
    envs = [container_env(docs, c) for _, c in _ours(docs).values()]
    for role in ROLES:
        key = f"RLAIFV_VLLM_{role.upper()}_URL"
        assert len({e[key] for e in envs}) == 1 and all(e["RLAIFV_ENGINE"] == "vllm" for e in envs), key
        assert api_root(envs[0][key] or "")[1].endswith("/v1")
    assert envs[0].get("RLAIFV_VLLM_REFERENCE", "server") == "server", "the reference is scored on its server"


def test_vllm_args_carry_what_the_engine_needs(rendered, overlay):
    """docs/vllm.md: raw log-probs, enough of them, prefix caching for the policy's N samples, the served names our
    engine asks for, the bundle's own folders, one dtype for both; no sampling defaults from the bundle's
    generation_config.json (the in-process sampler uses none); requests in flight finish on SIGTERM."""
    docs = rendered[overlay]
    _, server = _ours(docs)["rlaifv"]
    env = container_env(docs, server)
    dtypes = set()
    for role, (_, deployment, container) in _servers(docs).items():
        where = f"{overlay} {deployment['metadata']['name']}"
        assert container["command"] == ["vllm", "serve"], where
        positionals, flags = _flags(container["args"])
        assert positionals == [f"{env['RLAIFV_BUNDLE']}/{role}"], f"{where}: serves the bundle's {role}/ folder"
        assert flags["--served-model-name"] == env[f"RLAIFV_VLLM_{role.upper()}_MODEL"], where
        assert flags["--logprobs-mode"] == "raw_logprobs", f"{where}: the engine's policy log-probs are raw"
        assert int(str(flags["--max-logprobs"])) >= MAX_TOP_LOGPROBS, f"{where}: the API allows top_logprobs 20"
        assert flags["--generation-config"] == "vllm", where
        assert flags.get("--enable-prefix-caching") is (True if role == "policy" else None), where
        assert flags.get("--enable-scale-out") is True, f"{where}: image prompts use the token-in route"
        images = json.loads(str(flags["--limit-mm-per-prompt"]))["image"]
        assert images == int(env.get("RLAIFV_MAX_IMAGES", Settings().max_images)), f"{where}: = RLAIFV_MAX_IMAGES"
        assert "--api-key" not in flags and not any("api-key" in a or "API_KEY" in a for a in container["args"]), (
            f"{where}: the key comes from VLLM_API_KEY, never argv (ps shows argv to every user of the node)"
        )
        dtypes.add(flags["--dtype"])
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
        assert int(str(flags["--shutdown-timeout"])) > 0, f"{where}: 0 aborts requests in flight"
        assert grace >= float(pre_stop[1]) + int(str(flags["--shutdown-timeout"])) + 5, where
    assert len(dtypes) == 1, f"the reward is a difference of the two servers' log-probs: one dtype, not {dtypes}"


def test_vllm_args_parse_with_the_vllm_ci_runs(rendered, overlay, tmp_path):
    """vLLM's own `vllm serve` parser (the release the image tag names, from scripts/vllm-env) accepts both servers'
    args and reads them as intended; it also reads VLLM_API_KEY."""
    python = vllm_python()
    if python is None:
        if os.environ.get("CI"):
            pytest.fail("no vLLM venv: scripts/test runs scripts/vllm-env before pytest")
        pytest.skip("no vLLM venv (scripts/vllm-env; RLAIFV_VLLM_ENV=skip skips it)")
    servers = _servers(rendered[overlay])
    script = """
import json, sys
from vllm import envs
from vllm.version import __version__
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.utils.argparse_utils import FlexibleArgumentParser

parser = FlexibleArgumentParser()
command = ServeSubcommand()
command.subparser_init(parser.add_subparsers(dest="subparser"))
out = {"version": __version__, "api_key_env": envs.VLLM_API_KEY, "servers": {}}
for role, args in json.load(sys.stdin).items():
    parsed = parser.parse_args(["serve", *args])
    command.validate(parsed)
    out["servers"][role] = vars(parsed)
print(json.dumps(out, default=str))
"""
    args = {role: container["args"] for role, (_, _, container) in servers.items()}
    done = subprocess.run(
        [str(python), "-c", script],
        input=json.dumps(args),
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "VLLM_API_KEY": "from-the-environment", "HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["version"] == VLLM_VERSION
    assert out["api_key_env"] == "from-the-environment"
    for role, (_, _, container) in servers.items():
        parsed = out["servers"][role]
        _, flags = _flags(container["args"])
        assert [parsed["model_tag"]] == _flags(container["args"])[0]
        assert parsed["served_model_name"] == [flags["--served-model-name"]]
        assert parsed["logprobs_mode"] == "raw_logprobs" and parsed["max_logprobs"] >= MAX_TOP_LOGPROBS
        assert parsed["port"] == int(str(flags["--port"])) and parsed["generation_config"] == "vllm"
        assert parsed["shutdown_timeout"] == int(str(flags["--shutdown-timeout"]))
        assert parsed["api_key"] is None, "no --api-key: vLLM falls back to VLLM_API_KEY"
        assert parsed["disable_access_log_for_endpoints"] == "/health,/metrics"
        if role == "policy":
            assert parsed["enable_prefix_caching"] is True


def test_one_secret_keys_both_sides(rendered, overlay):
    docs = rendered[overlay]
    refs = set()
    for _, container in list(_ours(docs).values()) + vllm_containers(docs):
        name = "VLLM_API_KEY" if container["name"] == "vllm" else "RLAIFV_VLLM_API_KEY"
        (item,) = [e for e in container["env"] if e["name"] == name]
        assert "value" not in item, f"{container['name']}: {name} must come from a Secret"
        refs.add(json.dumps(item["valueFrom"]["secretKeyRef"], sort_keys=True))
    assert refs == {json.dumps({"key": "api-key", "name": "rlaifv-vllm"}, sort_keys=True)}, refs
    assert not find(docs, "Secret")
    assert "RLAIFV_VLLM_API_KEY" not in one(docs, "ConfigMap", "rlaifv")["data"]


def test_weights_are_the_bundles_folders_on_our_read_only_volume(rendered, overlay):
    docs = rendered[overlay]
    server_workload, server = _ours(docs)["rlaifv"]
    bundle = Path(container_env(docs, server)["RLAIFV_BUNDLE"] or "")

    def claim_of(workload: dict[str, Any], container: dict[str, Any], path: Path) -> str:
        (mount,) = [m for m in container["volumeMounts"] if path.is_relative_to(m["mountPath"])]
        assert mount["readOnly"] is True, f"{container['name']}: {path} read-only"
        (volume,) = [v for v in pod_spec(workload)["volumes"] if v["name"] == mount["name"]]
        assert volume["persistentVolumeClaim"]["readOnly"] is True
        return volume["persistentVolumeClaim"]["claimName"]

    ours = claim_of(server_workload, server, bundle)
    claim = one(docs, "PersistentVolumeClaim", ours)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "shared by every pod, filled once (models-loader.yaml)"
    for role, (_, deployment, container) in _servers(docs).items():
        (model,) = _flags(container["args"])[0]
        assert Path(model) == bundle / role
        assert claim_of(deployment, container, Path(model)) == ours, f"{role}: the same bundle our pods read"


def test_vllm_pods_probe_health_and_allow_for_loading(rendered, overlay):
    """vLLM's /health (200 once the engine runs, unauthenticated) on the served port; the startup probe allows 10
    minutes or more for the weights and CUDA graphs; liveness only fails after a minute of failures."""
    for _, (_, _, container) in _servers(rendered[overlay]).items():
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[kind]["httpGet"] == {"path": "/health", "port": "http"}, kind
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
        live = container["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] >= 60


def test_our_pods_wait_as_long_as_vllm_may_take_to_start(rendered, overlay):
    """On a fresh install all pods start together, but a vLLM pod's startup budget starts only once its image (GBs)
    is pulled, while ours starts at once: RLAIFV_VLLM_WAIT_S must cover vLLM's budget plus that pull, or our pods
    give up (and restart) first. (test_manifests.py checks that our startup probes outlast the wait.)"""
    docs = rendered[overlay]
    budget = max(
        c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] for _, c in vllm_containers(docs)
    )
    for name, (_, container) in _ours(docs).items():
        wait = float(container_env(docs, container)["RLAIFV_VLLM_WAIT_S"] or 0)
        assert wait >= budget + IMAGE_PULL_S, f"{name}: RLAIFV_VLLM_WAIT_S {wait} s < {budget} s + {IMAGE_PULL_S} s"


def test_vllm_pods_have_writable_caches_on_a_read_only_root(rendered, overlay):
    """The image runs as root with caches under /root; here it runs as a non-root UID on a read-only root, so HOME
    and the XDG/HF dirs point into an emptyDir, /tmp is one, and /dev/shm is a memory-backed one (the runtime's
    64 MiB is too small for vLLM's shared-memory queues and NCCL). Nothing phones home or downloads weights."""
    for workload, container in vllm_containers(rendered[overlay]):
        where = workload["metadata"]["name"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, where
        volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"] if not m.get("readOnly")}
        assert all("emptyDir" in v for v in mounts.values()), f"{where}: only emptyDirs are writable"
        env = {e["name"]: e.get("value") for e in container["env"]}
        for name in CACHE_ENV:
            assert any(Path(env[name] or "").is_relative_to(m) for m in mounts), f"{where}: {name}={env[name]}"
        assert "/tmp" in mounts
        shm = mounts["/dev/shm"]["emptyDir"]
        assert shm["medium"] == "Memory" and shm["sizeLimit"]
        assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_NO_USAGE_STATS"] == "1" and env["DO_NOT_TRACK"] == "1"
        assert not [e for e in env if e.startswith("RLAIFV_")] and not container.get("envFrom"), where


def test_only_our_pods_reach_vllm(rendered, overlay):
    """NetworkPolicy: every vLLM pod admits, on its served port only, the server and the worker (both run the vllm
    engine) of its own namespace, and nothing else; Redis does not admit the vLLM pods."""
    docs = rendered[overlay]
    pods = {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in workloads(docs)}
    policies = find(docs, "NetworkPolicy")
    for workload, container in vllm_containers(docs):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        mine = [p for p in policies if matches(p["spec"]["podSelector"], labels)]
        assert mine and all("Ingress" in p["spec"]["policyTypes"] for p in mine), workload["metadata"]["name"]
        (port,) = [p["containerPort"] for p in container["ports"]]
        allowed = set()
        for policy in mine:
            for rule in policy["spec"].get("ingress", []):
                assert [p["port"] for p in rule["ports"]] in ([port], ["http"]), rule
                for peer in rule["from"]:
                    assert set(peer) == {"podSelector"}, "no namespace or IP peers: only our own pods"
                    allowed |= {name for name, pod in pods.items() if matches(peer["podSelector"], pod)}
        assert allowed == set(OURS), f"{workload['metadata']['name']} admits {sorted(allowed)}"
    (redis,) = [p for p in policies if matches(p["spec"]["podSelector"], pods["rlaifv-redis"])]
    for workload, _ in vllm_containers(docs):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert not any(matches(peer["podSelector"], labels) for r in redis["spec"]["ingress"] for peer in r["from"])


def test_the_two_vllm_servers_differ_only_in_their_role(rendered, overlay):
    """Same image, security, probes, resources and flags: only names, labels, the model folder, the served name
    and the policy's --enable-prefix-caching differ (a fix to one server cannot miss the other)."""
    servers = _servers(rendered[overlay])

    def normalised(role: str) -> str:
        service, deployment, _ = servers[role]
        text = json.dumps([service, deployment], sort_keys=True).replace(role, "ROLE")
        return text.replace('"--enable-prefix-caching", ', "")

    assert normalised("policy") == normalised("reference")
