"""The shipped Grafana dashboard: what Grafana needs to import it, and queries that fit the
metric contract for any label set and any OS."""

from __future__ import annotations

import re
from typing import Any

import pytest
from prom_support import DATASOURCE, dashboard_queries, load_dashboard, walk_panels

DASHBOARD = load_dashboard()
PANELS = list(walk_panels(DASHBOARD["panels"]))
QUERIES = dashboard_queries(DASHBOARD)
VARIABLES = {v["name"]: v for v in DASHBOARD["templating"]["list"]}

CONTRACT_METRICS = {
    "kvm_processes",
    "kvm_threads",
    "kvm_load1",
    "kvm_load5",
    "kvm_load15",
    "kvm_cpus",
    "kvm_swap_size_bytes",
    "kvm_swap_used_bytes",
    "kvm_processes_limit",
    "kvm_threads_limit",
    "kvm_up",
    "kvm_poll_success",
    "kvm_poll_duration_seconds",
    "kvm_poll_errors_total",
}
"""Metrics the issue asks the dashboard to show."""

SELECTOR = re.compile(r"\b(kvm_[a-z0-9_]+)\b(\{[^}]*\})?")


def test_identity() -> None:
    assert isinstance(DASHBOARD["uid"], str) and re.fullmatch(r"[\w-]{1,40}", DASHBOARD["uid"])
    assert isinstance(DASHBOARD["title"], str) and DASHBOARD["title"].strip()
    assert isinstance(DASHBOARD["schemaVersion"], int) and DASHBOARD["schemaVersion"] >= 36
    # An exported dashboard carries no database id; Grafana assigns one on import.
    assert DASHBOARD.get("id") is None


def test_panel_ids_are_unique_integers() -> None:
    ids = [panel["id"] for panel in PANELS]
    assert all(isinstance(i, int) and i > 0 for i in ids)
    assert len(ids) == len(set(ids)), ids


@pytest.mark.parametrize("panel", PANELS, ids=lambda p: str(p["title"]))
def test_panel_and_targets_use_the_datasource_variable(panel: dict[str, Any]) -> None:
    assert panel["datasource"] == DATASOURCE
    for target in panel.get("targets", []):
        assert target["datasource"] == DATASOURCE, target["refId"]


@pytest.mark.parametrize("panel", PANELS, ids=lambda p: str(p["title"]))
def test_panel_shape(panel: dict[str, Any]) -> None:
    assert panel["type"] in {"row", "timeseries", "bargauge", "stat", "table"}
    assert panel["title"].strip()
    if panel["type"] == "row":
        assert "targets" not in panel
        return
    assert panel["targets"], "a panel without queries"
    ref_ids = [t["refId"] for t in panel["targets"]]
    assert len(ref_ids) == len(set(ref_ids))
    for target in panel["targets"]:
        assert isinstance(target.get("expr"), str) and target["expr"].strip(), target["refId"]


def test_layout_fits_and_does_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in PANELS:
        grid = panel["gridPos"]
        assert {"x", "y", "w", "h"} <= set(grid)
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["y"] >= 0
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_variables() -> None:
    datasource = VARIABLES["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    instance = VARIABLES["instance"]
    assert instance["type"] == "query"
    assert instance["datasource"] == DATASOURCE
    assert instance["definition"] == "label_values(kvm_up, instance)"
    query = instance["query"]
    assert (query["query"] if isinstance(query, dict) else query) == instance["definition"]
    assert instance["multi"] is True and instance["includeAll"] is True
    assert instance["refresh"] in (1, 2), "options must be loaded from Prometheus"


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: q.name)
def test_every_selector_follows_the_instance_variable(query: Any) -> None:
    selectors = SELECTOR.findall(query.expr)
    assert selectors, "no kvm_ metric in the query"
    for metric, matchers in selectors:
        assert 'instance=~"$instance"' in matchers, f"{metric} ignores $instance"


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: q.name)
def test_queries_work_for_any_label_set_and_os(query: Any) -> None:
    """Aggregations name what they keep (sum by), never the OS or the data source."""
    expr = query.expr
    assert "node_" not in expr
    for _, matchers in SELECTOR.findall(expr):
        assert "source" not in matchers, "no per-OS (procfs/libkvm) filtering"
    assert not re.search(r"\bwithout\b", expr)
    for metric in ("kvm_processes", "kvm_threads"):
        for match in re.finditer(rf"\b{metric}\{{", expr):
            before = expr[: match.start()]
            assert re.search(r"\b(sum|max|min) by \([^)]*\)\s*\($", before), (
                f"{metric} must be aggregated with sum by (...): the label set is configurable"
            )


def test_contract_metrics_are_all_shown() -> None:
    used = {metric for q in QUERIES for metric, _ in SELECTOR.findall(q.expr)}
    assert CONTRACT_METRICS - used == set()


def test_processes_by_state_is_stacked_and_top_users_use_topk() -> None:
    by_title = {panel["title"]: panel for panel in PANELS}
    states = by_title["Processes by state"]
    assert "by (instance, state)" in states["targets"][0]["expr"]
    assert states["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    assert by_title["Top users by processes"]["targets"][0]["expr"].startswith("topk(")
    assert "kvm_cpus" in by_title["Load per CPU"]["targets"][0]["expr"]
