"""Shared helpers for the tests of the shipped Prometheus rules and Grafana dashboard."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
RULES_FILE = REPO / "config" / "prometheus" / "kvm_exporter.rules.yml"
SCRAPE_FILE = REPO / "config" / "prometheus" / "scrape.yml"
TARGETS_FILE = REPO / "config" / "prometheus" / "targets.yml"
RULE_TESTS_FILE = REPO / "tests" / "rules" / "kvm_exporter.rules.test.yml"
DASHBOARD_FILE = REPO / "config" / "grafana" / "kvm_exporter.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
"""What every panel and target of the dashboard must name as its datasource."""


def binary(name: str) -> str:
    """Path of a program from Debian's ``prometheus`` package; fail (never skip) without it."""
    found = shutil.which(name)
    if found is None and Path("/usr/bin", name).exists():
        found = str(Path("/usr/bin", name))
    if found is None:
        pytest.fail(f"{name} not found: apt-get install prometheus (Debian's package)")
    return found


def prometheus_command(config: Path, tsdb: Path) -> Callable[[int], list[str]]:
    """The command line of Debian's Prometheus serving ``config`` on a loopback port."""

    def command(port: int) -> list[str]:
        return [
            binary("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={tsdb}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]

    return command


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of the shipped rules file."""
    doc = load_yaml(RULES_FILE)
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def load_dashboard() -> dict[str, Any]:
    with DASHBOARD_FILE.open(encoding="utf-8") as f:
        dashboard: dict[str, Any] = json.load(f)
    return dashboard


def walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))


@dataclass(frozen=True)
class PanelQuery:
    panel_id: int
    panel_title: str
    ref_id: str
    expr: str

    @property
    def name(self) -> str:
        return f"{self.panel_title}/{self.ref_id}"


def dashboard_queries(dashboard: dict[str, Any]) -> list[PanelQuery]:
    return [
        PanelQuery(panel["id"], panel["title"], target["refId"], target["expr"])
        for panel in walk_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
