"""The top processes in Prometheus: the example recording rules (promtool) and the dashboard's
"Top processes" row, evaluated by promtool's PromQL engine."""

from __future__ import annotations

from pathlib import Path

from prom_support import REPO
from test_alert_rules import promtool
from test_dashboard import PANELS, SELECTOR, promtool_expects, query
from test_top import TOP_FAMILIES

TOP_RULES = REPO / "config" / "prometheus" / "kvm_exporter.top.rules.yml"
TOP_RULE_TESTS = REPO / "tests" / "rules" / "kvm_exporter.top.rules.test.yml"


def test_promtool_checks_the_recording_rules(tmp_path: Path) -> None:
    result = promtool("check", "rules", str(TOP_RULES), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 2 rules found" in result.stdout


def test_the_recording_rules_keep_one_series_per_command_name(tmp_path: Path) -> None:
    result = promtool("test", "rules", str(TOP_RULE_TESTS), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    text = TOP_RULE_TESTS.read_text().replace("../../config/prometheus/", f"{TOP_RULES.parent}/")
    broken = tmp_path / "broken.test.yml"
    broken.write_text(text.replace("value: 0.8", "value: 0.7"))  # a wrong sum must fail
    result = promtool("test", "rules", str(broken), cwd=tmp_path)
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr


def test_top_row_is_last_and_shows_the_exporters_families() -> None:
    row = [p for p in PANELS if p["id"] >= 50]
    assert [(p["id"], p["type"], p["title"]) for p in row] == [
        (50, "row", "Top processes"),
        (51, "table", "Top processes"),
        (52, "timeseries", "Top processes by CPU"),
    ]
    assert row[0]["gridPos"]["y"] == max(p["gridPos"]["y"] for p in PANELS if p["type"] == "row")
    used = {m for p in row[1:] for t in p["targets"] for m, _ in SELECTOR.findall(t["expr"])}
    assert used == set(TOP_FAMILIES)
    assert all(t["instant"] and t["format"] == "table" for t in row[1]["targets"])


CPU = 'kvm_top_process_cpu_seconds_total{instance="a",pid="%s",comm="%s",user="u",mode="%s"}'
RSS = 'kvm_top_process_resident_memory_bytes{instance="a",pid="%s",comm="%s",user="u"}'


def test_top_panels_give_each_process_its_cores_memory_and_age(tmp_path: Path) -> None:
    series: dict[str, float | str] = {
        CPU % (7, "make", "user"): "0+30x5",  # half a core
        CPU % (7, "make", "system"): "0+15x5",
        CPU % (9, "cc", "user"): "0+6x5",
        RSS % (7, "make"): 2**20,
        RSS % (9, "cc"): 3 * 2**20,
        'kvm_top_process_start_time_seconds{instance="a",pid="9",comm="cc",user="u"}': 120,
    }
    rate = {
        '{instance="a",pid="7",comm="make",user="u"}': 0.75,
        '{instance="a",pid="9",comm="cc",user="u"}': 0.1,
    }
    promtool_expects(
        tmp_path, query("Top processes").replace("$__rate_interval", "5m"), series, rate
    )
    expr = query("Top processes by CPU").replace("$__rate_interval", "5m")
    promtool_expects(tmp_path, expr, series, rate)
    memory = {key: 2**20 * (1 if "make" in key else 3) for key in rate}
    promtool_expects(tmp_path, query("Top processes", "B"), series, memory)
    age = {'{instance="a",pid="9",comm="cc",user="u"}': 300 - 120}  # evaluated at 5m
    promtool_expects(tmp_path, query("Top processes", "C"), series, age)
