"""The alerts (deploy/k8s/components/monitoring/prometheusrule.yaml) are PromQL that Prometheus accepts, watch only
series the service's /metrics exports, and say how bad and what to do; the overlays with monitoring ship them."""

from __future__ import annotations

import re
from typing import Any

import promql_parser
import pytest
from deploy_helpers import Series, exported_series, find

METRIC = re.compile(r"\brlaifv_[A-Za-z0-9_:]+")
LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
ALERTS = {
    "RlaifvRedisMemoryHigh",
    "RlaifvRedisMemoryFull",
    "RlaifvJobsStoreFull",
    "RlaifvJobsNotDraining",
    "RlaifvServerErrors",
}


@pytest.fixture(scope="module")
def exported() -> dict[str, Series]:
    return exported_series()


def _rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rule for doc in find(docs, "PrometheusRule") for group in doc["spec"]["groups"] for rule in group["rules"]]


def test_overlays_with_service_monitors_ship_the_alerts(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, docs in rendered.items():
        alerts = {rule["alert"] for rule in _rules(docs)}
        assert alerts == (ALERTS if find(docs, "ServiceMonitor") else set()), overlay


def test_every_alert_parses_and_watches_exported_series(
    rendered: dict[str, list[dict[str, Any]]], exported: dict[str, Series]
) -> None:
    rules = _rules(rendered["gpu"])
    assert rules
    for rule in rules:
        name, expr = rule["alert"], rule["expr"]
        try:
            promql_parser.parse(expr)
        except ValueError as exc:
            pytest.fail(f"{name}: not PromQL ({exc}): {expr}")
        names = set(METRIC.findall(expr))
        assert names and names <= set(exported), f"{name} watches {sorted(names - set(exported))}: not exported"
        known = set().union(*(exported[n].labels for n in names))
        assert set(LABEL.findall(expr)) <= known, f"{name} matches labels its series do not have"
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"], name
        assert rule.get("for"), f"{name} fires on one scrape: give it a `for`"


def test_the_queries_a_scaler_reads_are_promql(rendered: dict[str, list[dict[str, Any]]]) -> None:
    queries = [
        trigger["metadata"]["query"]
        for docs in rendered.values()
        for scaler in find(docs, "ScaledObject")
        for trigger in scaler["spec"]["triggers"]
        if trigger["type"] == "prometheus"
    ]
    assert queries
    for query in queries:
        promql_parser.parse(query)


def test_a_broken_expression_is_caught() -> None:
    with pytest.raises(ValueError):
        promql_parser.parse("max(rlaifv_redis_used_memory_bytes) / max(rlaifv_redis_maxmemory_bytes > 0")
