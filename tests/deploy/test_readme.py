"""deploy/README.md's settings table is generated from service/settings.py's Settings and the rendered overlays.
Regenerate it after changing either: .venv/bin/python tests/deploy/test_readme.py --write"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from deploy_helpers import DEPLOY, K8S, render

from rlaifv.service.settings import Settings

README = DEPLOY / "README.md"
START, END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"
COLUMNS = ("gpu", "gpu-vllm", "cpu-dev")


def _server_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    (server,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "rlaifv"]
    (container,) = [c for c in server["spec"]["template"]["spec"]["containers"] if c["name"] == "server"]
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "rlaifv"]
    env = dict(configmap["data"])
    env.update({e["name"]: e.get("value", "(secret)") for e in container.get("env", [])})
    return env


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return "`" + text.replace("|", "\\|") + "`" if text else "—"


def settings_table(rendered: dict[str, list[dict[str, Any]]]) -> str:
    envs = {name: _server_env(rendered[name]) for name in COLUMNS}
    lines = [
        "| variable | default (code) | " + " | ".join(f"`{c}` server" for c in COLUMNS) + " | meaning |",
        "|---|---|" + "---|" * len(COLUMNS) + "---|",
    ]
    for name, field in Settings.model_fields.items():
        env = f"RLAIFV_{name.upper()}"
        default = field.default_factory() if field.default_factory else field.default
        cells = " | ".join(_cell(envs[c].get(env)) for c in COLUMNS)
        lines.append(f"| `{env}` | {_cell(default)} | {cells} | {(field.description or '').replace('|', '/')} |")
    return "\n".join(lines)


def test_settings_table_is_current(rendered):
    text = README.read_text()
    assert START in text and END in text
    current = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert current == settings_table(rendered), "deploy/README.md is stale: python tests/deploy/test_readme.py --write"


def test_readme_links_resolve():
    text = README.read_text()
    targets = ("grafana/rlaifv-dashboard.json", "k8s/overlays/gpu", "k8s/overlays/gpu-vllm", "k8s/overlays/cpu-dev")
    for target in (*targets, "schemas/README.md", "../docs/vllm.md"):
        assert f"({target})" in text and (DEPLOY / target).exists(), target


if __name__ == "__main__":
    table = settings_table({name: render(K8S / "overlays" / name) for name in COLUMNS})
    if "--write" in sys.argv:
        head, rest = README.read_text().split(START, 1)
        README.write_text(head + START + "\n" + table + "\n" + END + rest.split(END, 1)[1])
    else:
        print(table)
