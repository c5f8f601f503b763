"""deploy/grafana/rlaifv-dashboard.json imports into Grafana as it is, charts only series the service's /metrics
exports (names and label names), charts every one of them, and lays its panels out without overlaps."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import Series, exported_series

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "rlaifv-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
TARGET_LABELS = {"job", "instance"}
METRIC = re.compile(r"\brlaifv_[A-Za-z0-9_:]+")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
VARIABLE = re.compile(r"\$(?:\{)?([A-Za-z_][A-Za-z0-9_]*)")
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def exported() -> dict[str, Series]:
    return exported_series()


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    found = [
        (f"panel '{panel['title']}' target {target['refId']}", target["expr"])
        for panel in _panels(dashboard)
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found.append((f"variable ${variable['name']}", variable["definition"]))
    return found


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = _panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("x", "y", "w", "h")), panel["title"]
        assert grid["x"] >= 0 and grid["w"] >= 1 and grid["x"] + grid["w"] <= 24 and grid["h"] >= 1, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", DATASOURCE) == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]
    for where, query in _queries(dashboard):
        for opening, closing in ("()", "{}", "[]"):
            assert query.count(opening) == query.count(closing), f"{where}: unbalanced {opening}{closing}"
        unknown = set(VARIABLE.findall(query)) - set(variables) - BUILTIN_VARIABLES
        assert not unknown, f"{where} uses undefined variables {unknown}"


def test_no_two_panels_overlap(dashboard: dict[str, Any]) -> None:
    boxes = [(panel["title"], panel["gridPos"]) for panel in _panels(dashboard)]
    for (a, p), (b, q) in itertools.combinations(boxes, 2):
        apart = (
            p["x"] + p["w"] <= q["x"]
            or q["x"] + q["w"] <= p["x"]
            or p["y"] + p["h"] <= q["y"]
            or q["y"] + q["h"] <= p["y"]
        )
        assert apart, f"panels '{a}' and '{b}' overlap"


def test_every_series_exists_in_metrics_output(dashboard: dict[str, Any], exported: dict[str, Series]) -> None:
    for where, query in _queries(dashboard):
        names = set(METRIC.findall(query))
        assert names, f"{where} charts no rlaifv_ metric"
        missing = names - set(exported)
        assert not missing, f"{where} uses {sorted(missing)}, which /metrics does not export"
        known = TARGET_LABELS.union(*(exported[name].labels for name in names))
        used = {label.strip() for group in GROUPING.findall(query) for label in group.split(",") if label.strip()}
        used |= set(MATCHER.findall(query))
        assert used <= known, f"{where} uses labels {sorted(used - known)} that {sorted(names)} do not have"


def test_every_exported_metric_is_charted(dashboard: dict[str, Any], exported: dict[str, Series]) -> None:
    names = {name for _, query in _queries(dashboard) for name in METRIC.findall(query)}
    charted = {exported[name].family for name in names if name in exported}
    uncharted = {series.family for series in exported.values()} - charted
    assert not uncharted, f"metrics missing from the dashboard (add a panel): {sorted(uncharted)}"


# Fields Grafana still reads that its generated schema models leave out (legacy but valid).
LEGACY_FIELDS = {"builtIn", "definition"}


def test_grafanas_own_schema_models_read_the_whole_dashboard(dashboard: dict[str, Any]) -> None:
    """Parsed with Grafana's dashboard models (grafana-foundation-sdk, generated from its schema), nothing is lost."""
    from grafana_foundation_sdk.models.dashboard import Dashboard

    def plain(value: Any) -> Any:
        if hasattr(value, "to_json"):
            return plain(value.to_json())
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    dropped: list[str] = []

    def compare(original: Any, parsed: Any, path: str) -> None:
        if isinstance(original, dict):
            for key, value in original.items():
                if key not in parsed:
                    dropped.append(f"{path}.{key}")
                else:
                    compare(value, parsed[key], f"{path}.{key}")
        elif isinstance(original, list):
            assert isinstance(parsed, list) and len(parsed) == len(original), path
            for i, (a, b) in enumerate(zip(original, parsed, strict=True)):
                compare(a, b, f"{path}[{i}]")
        else:
            assert parsed == original, f"{path}: {original!r} read as {parsed!r}"

    compare(dashboard, plain(Dashboard.from_json(dashboard)), "")
    assert {p.rsplit(".", 1)[-1] for p in dropped} <= LEGACY_FIELDS, dropped
