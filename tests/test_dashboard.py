"""The shipped Grafana dashboard: what Grafana needs to import it, and queries that fit the
metric contract for any label set and any OS."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prom_support import DATASOURCE, binary, dashboard_queries, load_dashboard, walk_panels

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
    assert "kvm_cpus" in by_title["Load per CPU"]["targets"][0]["expr"]


def query(title: str, ref_id: str = "A") -> str:
    """The panel's query as Grafana sends it with every instance selected."""
    (expr,) = [q.expr for q in QUERIES if q.panel_title == title and q.ref_id == ref_id]
    return expr.replace("$instance", ".*")


def promtool_expects(
    tmp_path: Path, expr: str, series: dict[str, float | str], expected: dict[str, float]
) -> None:
    """``expr`` over ``series`` (a number: constant for five minutes; a string: promtool's
    expanding notation, one value a minute) gives exactly ``expected``, evaluated by promtool's
    PromQL engine (a ``promql_expr_test``)."""

    def values(v: float | str) -> str:
        return v if isinstance(v, str) else f"{v}x5"

    test = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": k, "values": values(v)} for k, v in series.items()],
                "promql_expr_test": [
                    {
                        "expr": expr,
                        "eval_time": "5m",
                        "exp_samples": [{"labels": k, "value": v} for k, v in expected.items()],
                    }
                ],
            }
        ],
    }
    path = tmp_path / f"expr{len(list(tmp_path.iterdir()))}.test.yml"
    path.write_text(yaml.safe_dump(test))
    result = subprocess.run(
        [binary("promtool"), "test", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, f"{expr}\n{result.stdout}{result.stderr}"


CPU_RATE = re.compile(r"rate\(\w+_cpu_seconds_total\b")
ROW_Y = {p["title"]: p["gridPos"]["y"] for p in PANELS if p["type"] == "row"}


def test_cpu_panels_are_in_cores() -> None:
    """A rate of CPU seconds is CPUs kept busy: Grafana's custom unit says cores."""
    cpu = [p for p in PANELS if any(CPU_RATE.search(t["expr"]) for t in p.get("targets", []))]
    assert {p["title"] for p in cpu} >= {"CPU by user", "CPU by jail", "CPU per group"}
    for panel in cpu:
        assert panel["fieldConfig"]["defaults"]["unit"] == "suffix:cores", panel["title"]


def test_named_groups_row_shows_cpu_per_group_in_cores(tmp_path: Path) -> None:
    """process-exporter users' main panel: each group's user and system CPU together, as the
    cores it kept busy; a group's counters from the exporter's own names."""
    cpu = 'kvm_namegroup_cpu_seconds_total{instance="a",group="%s",mode="%s"}'
    series: dict[str, float | str] = {
        cpu % ("nginx", "user"): "0+30x5",  # 30 s of CPU a minute: half a core
        cpu % ("nginx", "system"): "0+15x5",
        cpu % ("sshd", "user"): "7x5",  # idle
        cpu % ("sshd", "system"): "1x5",
    }
    expected = {'{instance="a",group="nginx"}': 0.75, '{instance="a",group="sshd"}': 0.0}
    expr = query("CPU per group").replace("$__rate_interval", "5m")
    promtool_expects(tmp_path, expr, series, expected)
    row = [p for p in PANELS if p["gridPos"]["y"] > ROW_Y["Named process groups"]]
    assert "CPU per group" in {p["title"] for p in row}


def census(instance: str, counts: dict[tuple[str, str], int], folded: int) -> dict[str, float]:
    """kvm_processes of one exporter: ``counts`` per (user, tty) sleeping, ``folded`` in
    ``other``, and the zero-filled ``other`` rows of the states nobody is in."""
    series = {
        f'kvm_processes{{instance="{instance}",user="{u}",tty="{t}",state="sleeping"}}': float(n)
        for (u, t), n in counts.items()
    }
    other = f'kvm_processes{{instance="{instance}",user="other",tty="other",state="%s"}}'
    series[other % "sleeping"] = float(folded)
    for state in ("zombie", "stopped", "running"):
        series[other % state] = 0.0
    return series


def test_top_panels_rank_per_instance_without_zero_rows(tmp_path: Path) -> None:
    """A busy host does not push a quiet one out of the ranking; zero-filled rows are no bars,
    a folded 'other' with processes in it is one."""
    busy = {(f"u{i:02}", f"pts/{i}"): i + 1 for i in range(17)}
    quiet = {("www", "none"): 5, ("root", "none"): 7, ("alice", "pts/0"): 2}
    series = census("busy", busy, 0) | census("quiet", quiet, 3)

    def expected(label: str, top: int) -> dict[str, float]:
        at = 0 if label == "user" else 1
        ranked = sorted(busy.items(), key=lambda item: -item[1])[:top]
        out = {f'{{instance="busy",{label}="{key[at]}"}}': float(n) for key, n in ranked}
        quiet_sums: dict[str, int] = {"other": 3}
        for key, n in quiet.items():
            quiet_sums[key[at]] = quiet_sums.get(key[at], 0) + n
        out.update({f'{{instance="quiet",{label}="{k}"}}': float(n) for k, n in quiet_sums.items()})
        return out

    promtool_expects(tmp_path, query("Top users by processes"), series, expected("user", 10))
    promtool_expects(tmp_path, query("Processes by tty"), series, expected("tty", 15))


def test_swap_panels_show_zero_for_a_host_without_swap(tmp_path: Path) -> None:
    """withswap: one device a quarter used; noswap: the swap poll works and finds no device:
    0, not "No data"; failing: the swap poll fails, so nothing is known and nothing shown."""
    series = {
        'kvm_swap_used_bytes{instance="withswap",device="/dev/sda2"}': 250,
        'kvm_swap_size_bytes{instance="withswap",device="/dev/sda2"}': 1000,
        'kvm_poll_success{instance="withswap",collector="swap"}': 1,
        'kvm_poll_success{instance="noswap",collector="swap"}': 1,
        'kvm_poll_success{instance="failing",collector="swap"}': 0,
    }
    device = '{instance="withswap",device="/dev/sda2"}'
    share = query("Swap used")
    promtool_expects(
        tmp_path, share, series, {'{instance="withswap"}': 0.25, '{instance="noswap"}': 0}
    )
    used, size = query("Swap used and size per device"), query("Swap used and size per device", "B")
    promtool_expects(tmp_path, used, series, {device: 250, '{instance="noswap"}': 0})
    promtool_expects(tmp_path, size, series, {device: 1000, '{instance="noswap"}': 0})


def test_jail_panels_serve_a_mixed_fleet(tmp_path: Path) -> None:
    """One query for every host: a FreeBSD host labelled by jail and user, a Linux host
    labelled by user alone (no jail label: all of it is 'host')."""
    series = {
        'kvm_resident_memory_bytes{instance="bsd",user="www",jail="www"}': 300,
        'kvm_resident_memory_bytes{instance="bsd",user="root",jail="www"}': 100,
        'kvm_resident_memory_bytes{instance="bsd",user="root",jail="host"}': 100,
        'kvm_memory_total_bytes{instance="bsd"}': 1000,
        'kvm_resident_memory_bytes{instance="linux",user="root"}': 50,
        'kvm_resident_memory_bytes{instance="linux",user="nobody"}': 150,
        'kvm_memory_total_bytes{instance="linux"}': 400,
    }
    promtool_expects(
        tmp_path,
        query("Memory share by jail"),
        series,
        {
            '{instance="bsd",jail="www"}': 0.4,
            '{instance="bsd",jail="host"}': 0.1,
            '{instance="linux",jail="host"}': 0.5,
        },
    )
