"""The shipped alert rules: valid for promtool, and every alert unit-tested firing and quiet."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prom_support import (
    RULE_TESTS_FILE,
    RULES_FILE,
    SCRAPE_FILE,
    TARGETS_FILE,
    alert_rules,
    binary,
    load_yaml,
)

SEVERITIES = {"critical", "warning", "info"}


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_promtool_check_rules(tmp_path: Path) -> None:
    result = promtool("check", "rules", str(RULES_FILE), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_test_rules(tmp_path: Path) -> None:
    result = promtool("test", "rules", str(RULE_TESTS_FILE), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rule_tests_can_fail(tmp_path: Path) -> None:
    """A wrong expectation makes promtool fail: the unit tests really compare alerts."""
    text = RULE_TESTS_FILE.read_text(encoding="utf-8")
    text = text.replace("../../config/prometheus/kvm_exporter.rules.yml", str(RULES_FILE))
    assert "web01:9429: 75 zombie processes" in text
    broken = tmp_path / "broken.test.yml"
    broken.write_text(text.replace("web01:9429: 75 zombie", "web01:9429: 74 zombie"))
    result = promtool("test", "rules", str(broken), cwd=tmp_path)
    assert result.returncode != 0
    assert "KvmZombiesAccumulating" in result.stdout + result.stderr


def test_every_alert_fires_and_stays_quiet_in_a_unit_test() -> None:
    doc = load_yaml(RULE_TESTS_FILE)
    assert doc["rule_files"] == ["../../config/prometheus/kvm_exporter.rules.yml"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for group in doc["tests"]:
        for case in group.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), "alerts without a firing test case"
    assert names - quiet == set(), "alerts without a not-firing test case"
    assert (firing | quiet) - names == set(), "test cases for alerts that do not exist"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: str(rule["alert"]))
def test_alert_has_severity_summary_and_description(rule: dict[str, Any]) -> None:
    assert re.fullmatch(r"Kvm[A-Za-z]+", rule["alert"])
    assert rule["labels"]["severity"] in SEVERITIES
    annotations = rule["annotations"]
    assert set(annotations) >= {"summary", "description"}
    for key in ("summary", "description"):
        assert "$labels.instance" in annotations[key], f"{key} must name the instance"
    if not rule["expr"].rstrip().endswith(("== 0", "== 1")):
        # A threshold alert says how far over it is; a 0/1 health alert's value says nothing.
        assert "$value" in annotations["summary"] + annotations["description"]


def test_alerts_keep_the_instance_label() -> None:
    """Aggregations keep instance (and job), whatever label set the exporter is configured with."""
    for rule in alert_rules():
        for grouping in re.findall(r"\bby \(([^)]*)\)", rule["expr"]):
            labels = {label.strip() for label in grouping.split(",")}
            assert {"job", "instance"} <= labels, rule["alert"]
        for label in ("user", "tty"):  # as a label name: in a matcher, by () or on ()
            used = re.search(rf"[{{(,]\s*{label}\s*(=|!|,|\))", rule["expr"])
            assert used is None, f"{rule['alert']} depends on the {label} label"


def test_scrape_config_example(tmp_path: Path) -> None:
    result = promtool("check", "config", str(SCRAPE_FILE), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    scrape = load_yaml(SCRAPE_FILE)
    (job,) = [job for job in scrape["scrape_configs"] if job["job_name"] == "kvm"]
    assert job["static_configs"] and job["file_sd_configs"]
    assert [str(TARGETS_FILE.name)] == job["file_sd_configs"][0]["files"]
    groups = load_yaml(TARGETS_FILE)
    assert groups and all(re.fullmatch(r"[\w.-]+:\d+", t) for g in groups for t in g["targets"])
    # The target-down alert selects the job name this example uses.
    (down,) = [rule for rule in alert_rules() if rule["alert"] == "KvmExporterTargetDown"]
    assert 'job="kvm"' in down["expr"]
