"""A real Prometheus scrapes a fleet of three real exporters; every dashboard query answers.

One exporter reads this machine's live /proc, one a fixture /proc of a Linux host without swap;
two read FreeBSD scenarios through the fake libkvm (tests/fakelib.py), the same cffi code path
as on FreeBSD. Debian's ``prometheus``
scrapes them every second on loopback with the shipped alert rules loaded, and each PromQL
expression of each dashboard panel, with its template variables filled in, is evaluated
through the HTTP API for each instance.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import copy_proc_fixture, free_port, listens
from fakelib import build_fake_libkvm
from prom_support import (
    REPO,
    RULES_FILE,
    PanelQuery,
    alert_rules,
    dashboard_queries,
    load_dashboard,
    prometheus_command,
)

SCENARIOS = REPO / "tests" / "fakekvm" / "scenarios"
QUERIES = dashboard_queries(load_dashboard())
HOSTS = ("live", "noswap", "web01", "db01")
"""live: this machine's /proc; noswap: the fixture /proc (tests/fixtures/proc) with an empty
/proc/swaps; web01, db01: FreeBSD scenarios through the fake libkvm."""
LIBKVM_HOSTS = ("web01", "db01")

SWAP_PANELS = {"Swap used and size per device", "Swap used"}
"""A host without swap has no swap series (metric contract); these panels show it as 0."""
IDLE_RATIOS = {"CPU accounted to users/jails/groups vs host/C"}
"""Ratios to the host's busy CPU: no data while the host does no work (0/0), as on the
fixture hosts, whose counters never move."""

GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}
"""Grafana's built-in variables, filled as Grafana would for a short time range. The
exporters are scraped every second, so one minute always holds the two samples rate needs."""

STARTUP_TIMEOUT = 60.0

EVERY_COMM = [{"name": "{{.Comm}}", "cmdline": [".*"]}]
"""A group per comm (process-exporter's catch-all example): the group panels have data."""


@dataclass
class Host:
    name: str
    source: str
    has_swap: bool
    instance: str
    """The instance label Prometheus gives the target: 127.0.0.1:PORT."""
    process: subprocess.Popen[bytes]
    log: Path


@dataclass
class Fleet:
    prometheus: str
    """Base URL of the Prometheus server."""
    hosts: dict[str, Host]
    log: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        body = get_json(url)
        assert body["status"] == "success", body
        assert body["data"]["resultType"] == "vector", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_for(what: str, check: Callable[[], bool], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, ValueError, KeyError):
            pass  # not listening yet, or an answer without the fields yet
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; log:\n{tail(log)}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def start_listening(
    name: str,
    command: Callable[[int], list[str]],
    ready: Callable[[str], bool],
    env: dict[str, str],
    log: Path,
    started: list[subprocess.Popen[bytes]],
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a server on a free loopback port; retry on another port if it was taken."""
    for _attempt in range(5):
        port = free_port()
        with log.open("ab") as out:
            process = subprocess.Popen(
                command(port), stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env
            )
        started.append(process)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if listens(process.pid, port) and ready(base):
                    return process, port
            except OSError:
                pass
            time.sleep(0.2)
        stop(process)
        if "address already in use" not in log.read_text(errors="replace").lower():
            break
    pytest.fail(f"{name} did not start; log:\n{tail(log)}")


def exporter_command() -> list[str]:
    script = Path(sys.executable).with_name("kvm_exporter")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kvm_exporter"]


def serves_metrics(base: str) -> bool:
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
        return bool(response.status == 200 and b"kvm_up" in response.read())


def prometheus_ready(base: str) -> bool:
    with urllib.request.urlopen(f"{base}/-/ready", timeout=5) as response:
        return bool(response.status == 200)


def query(url: str, expr: str, min_samples: int = 1) -> list[dict[str, Any]]:
    """The result of an instant query; for a range selector, only series with enough samples."""
    body = get_json(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return [s for s in result if len(s.get("values", [s.get("value")])) >= min_samples]


def assert_panel_has_data(url: str, panel: str, expr: str) -> None:
    """A dashboard panel's query answers on the Prometheus at ``url``, no value negative."""
    result = query(url, expr)
    assert result, f"{panel}: {expr} returned nothing"
    assert all(float(s["value"][1]) >= 0 for s in result)


@contextmanager
def scraped_exporter(
    tmp: Path, config: Path, env: dict[str, str], job: str
) -> Iterator[tuple[str, str]]:
    """A kvm_exporter on ``config`` and a Prometheus scraping it every second as ``job``,
    once it has scraped twice: (Prometheus URL, exporter instance). Both stop on exit."""
    started: list[subprocess.Popen[bytes]] = []
    try:

        def exporter(port: int) -> list[str]:
            address = f"--web.listen-address=127.0.0.1:{port}"
            return [*exporter_command(), f"--config.file={config}", address]

        _, port = start_listening(
            "exporter", exporter, serves_metrics, env, tmp / "exporter.log", started
        )
        instance = f"127.0.0.1:{port}"
        scrape = {"job_name": job, "static_configs": [{"targets": [instance]}]}
        prom_config = tmp / "prometheus.yml"
        prom_config.write_text(
            yaml.safe_dump({"global": {"scrape_interval": "1s"}, "scrape_configs": [scrape]})
        )
        log = tmp / "prometheus.log"
        server = prometheus_command(prom_config, tmp / "tsdb")
        _, prom_port = start_listening(
            "prometheus", server, prometheus_ready, dict(os.environ), log, started
        )
        url = f"http://127.0.0.1:{prom_port}"
        wait_for("two scrapes", lambda: bool(query(url, "kvm_up[10s]", 2)), 60, log)
        yield url, instance
    finally:
        for process in reversed(started):
            stop(process)


def live_has_swap() -> bool:
    lines = Path("/proc/swaps").read_text().splitlines()
    return len(lines) > 1  # a header, then one line per active device


def scenario_has_swap(path: Path) -> bool:
    return any(line.split()[:1] == ["swap"] for line in path.read_text().splitlines())


def start_exporter(
    name: str, tmp: Path, started: list[subprocess.Popen[bytes]], library: Path | None
) -> Host:
    config: dict[str, Any] = {
        "interval": "1s",
        "groups": {"process_names": EVERY_COMM},
        "top": {"n": 5},  # off by default; the dashboard's top panels need it
    }
    env = dict(os.environ)
    env.pop("FAKE_KVM_SCENARIO", None)
    if name == "noswap":
        root = copy_proc_fixture(tmp / "noswap-proc")
        (root / "swaps").write_text((root / "swaps").read_text().splitlines()[0] + "\n")
        source, has_swap = "procfs", False
        config["procfs"] = {"root": str(root)}
    elif library is None:
        source, has_swap = "procfs", live_has_swap()
    else:
        scenario = SCENARIOS / f"{name}.scenario"
        source, has_swap = "libkvm", scenario_has_swap(scenario)
        config.update(source="libkvm", libkvm={"library": str(library)})
        env["FAKE_KVM_SCENARIO"] = str(scenario)
    config_file = tmp / f"{name}.yml"
    config_file.write_text(yaml.safe_dump(config))
    log = tmp / f"{name}.log"

    def command(port: int) -> list[str]:
        return [
            *exporter_command(),
            "--config.file",
            str(config_file),
            "--web.listen-address",
            f"127.0.0.1:{port}",
        ]

    process, port = start_listening(name, command, serves_metrics, env, log, started)
    return Host(name, source, has_swap, f"127.0.0.1:{port}", process, log)


def prometheus_config(hosts: dict[str, Host]) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES_FILE)],
        "scrape_configs": [
            {
                "job_name": "kvm",
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "static_configs": [{"targets": [h.instance for h in hosts.values()]}],
            }
        ],
    }


def scraped_twice(fleet: Fleet) -> bool:
    targets = get_json(f"{fleet.prometheus}/api/v1/targets?state=active")["data"]
    kvm = [t for t in targets["activeTargets"] if t["labels"]["job"] == "kvm"]
    if len(kvm) != len(fleet.hosts) or any(t["health"] != "up" for t in kvm):
        return False
    counts = fleet.query('count_over_time(kvm_up{job="kvm"}[10m])')
    scraped = {s["metric"]["instance"] for s in counts if float(s["value"][1]) >= 2}
    return scraped == {h.instance for h in fleet.hosts.values()}


def rules_evaluated(fleet: Fleet) -> bool:
    groups = get_json(f"{fleet.prometheus}/api/v1/rules")["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    return bool(rules) and all(rule["health"] != "unknown" for rule in rules)


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    started: list[subprocess.Popen[bytes]] = []
    try:
        library = build_fake_libkvm(tmp)
        hosts = {
            name: start_exporter(name, tmp, started, library if name in LIBKVM_HOSTS else None)
            for name in HOSTS
        }
        config = tmp / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config(hosts)))
        log = tmp / "prometheus.log"

        command = prometheus_command(config, tmp / "tsdb")
        _, port = start_listening(
            "prometheus", command, prometheus_ready, dict(os.environ), log, started
        )
        fleet = Fleet(f"http://127.0.0.1:{port}", hosts, log)
        wait_for("two scrapes of every target", lambda: scraped_twice(fleet), 60, log)
        wait_for("the first evaluation of the rules", lambda: rules_evaluated(fleet), 30, log)
        yield fleet
    finally:
        for process in reversed(started):
            stop(process)


def fill_variables(expr: str, instance: str) -> str:
    """The query Grafana sends with $instance set to one instance."""
    # Grafana regex-escapes a value used with =~ and PromQL strings need the backslash doubled.
    filled = expr.replace("$instance", re.escape(instance).replace("\\", "\\\\"))
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        filled = filled.replace(name, GRAFANA_VARIABLES[name])
    assert "$" not in filled, f"a template variable the test does not fill: {filled}"
    return filled


def test_every_exporter_and_prometheus_are_running(fleet: Fleet) -> None:
    for host in fleet.hosts.values():
        assert host.process.poll() is None, f"{host.name} exited:\n{tail(host.log)}"
    targets = get_json(f"{fleet.prometheus}/api/v1/targets?state=active")["data"]
    kvm = {t["labels"]["instance"]: t for t in targets["activeTargets"]}
    assert set(kvm) == {host.instance for host in fleet.hosts.values()}
    for target in kvm.values():
        assert target["health"] == "up" and target["lastError"] == "", target


def test_every_host_polls_its_source(fleet: Fleet) -> None:
    """The live host reads /proc, the scenario hosts go through libkvm, and all polls work."""
    for host in fleet.hosts.values():
        selector = f"{{instance={json.dumps(host.instance)}}}"
        info = fleet.query(f"kvm_exporter_build_info{selector}")
        assert [s["metric"]["source"] for s in info] == [host.source], host.name
        up = fleet.query(f"kvm_up{selector}")
        assert [s["value"][1] for s in up] == ["1"], f"{host.name}:\n{tail(host.log)}"


def test_scenario_hosts_have_swap() -> None:
    """So the swap panels are proven with data at least on the FreeBSD hosts."""
    for name in LIBKVM_HOSTS:
        assert scenario_has_swap(SCENARIOS / f"{name}.scenario"), name


@dataclass(frozen=True)
class Scenario:
    """What a fake-libkvm scenario file says about its host."""

    sysctls: dict[str, int]
    loadavg: tuple[float, float, float]
    swap_pages: dict[str, tuple[int, int]]
    """Device name -> (used, total) pages."""
    processes: int
    threads: int


def read_scenario(path: Path) -> Scenario:
    sysctls: dict[str, int] = {}
    loadavg = (math.nan, math.nan, math.nan)
    swap: dict[str, tuple[int, int]] = {}
    processes = threads = 0
    for line in path.read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "sysctl":
            sysctls[words[1]] = int(words[2])
        elif words[0] == "loadavg":
            loadavg = (float(words[1]), float(words[2]), float(words[3]))
        elif words[0] == "swap":
            swap[words[1]] = (int(words[2]), int(words[3]))
        elif words[0] == "proc":
            keys = dict(word.split("=", 1) for word in words[1:])
            if keys.get("stat") == "SIDL":
                continue  # being created: neither the kernel nor libkvm lists it
            processes += 1
            threads += int(keys.get("threads", "1"))
    return Scenario(sysctls, loadavg, swap, processes, threads)


@pytest.mark.parametrize("host_name", LIBKVM_HOSTS)
def test_scenario_values_reach_prometheus(fleet: Fleet, host_name: str) -> None:
    """The numbers behind the panels are the scenario's, end to end through Prometheus."""
    host = fleet.hosts[host_name]
    scenario = read_scenario(SCENARIOS / f"{host_name}.scenario")
    page = scenario.sysctls["hw.pagesize"]

    def value(expr: str) -> float:
        result = fleet.query(f"sum({expr}{{instance={json.dumps(host.instance)}}})")
        assert len(result) == 1, expr
        return float(result[0]["value"][1])

    assert value("kvm_processes") == scenario.processes
    assert value("kvm_threads") == scenario.threads
    assert value("kvm_cpus") == scenario.sysctls["hw.ncpu"]
    assert value("kvm_processes_limit") == scenario.sysctls["kern.maxproc"]
    assert value("kvm_threads_limit") == scenario.sysctls["kern.maxthread"]
    load1, load5, load15 = scenario.loadavg
    assert value("kvm_load1") == pytest.approx(load1, abs=0.01)
    assert value("kvm_load5") == pytest.approx(load5, abs=0.01)
    assert value("kvm_load15") == pytest.approx(load15, abs=0.01)
    for metric, index in (("kvm_swap_used_bytes", 0), ("kvm_swap_size_bytes", 1)):
        result = fleet.query(f"{metric}{{instance={json.dumps(host.instance)}}}")
        per_device = {s["metric"]["device"]: float(s["value"][1]) for s in result}
        # Device names as swapinfo(8) prints them (and Linux's /proc/swaps): /dev/ada0p3.
        expected = {
            f"/dev/{name}": pages[index] * page for name, pages in scenario.swap_pages.items()
        }
        assert per_device == expected, metric


def test_linux_limits_are_the_task_limit(fleet: Fleet) -> None:
    """The fixture's pid_max 32768 and threads-max 63704: PIDs 1 to 32767 bound threads and
    processes alike, and the thread limit panel shows it."""
    instance = json.dumps(fleet.hosts["noswap"].instance)
    for metric in ("kvm_processes_limit", "kvm_threads_limit"):
        result = fleet.query(f"{metric}{{instance={instance}}}")
        assert [float(s["value"][1]) for s in result] == [32767], metric
    raw = fleet.query(f"kvm_swap_size_bytes{{instance={instance}}}")
    assert raw == [], "the contract: no swap series for a host without swap"


def test_swap_panels_are_the_listed_ones() -> None:
    swap = {q.panel_title for q in QUERIES if "kvm_swap_" in q.expr}
    assert swap == SWAP_PANELS


@pytest.mark.parametrize("host_name", HOSTS)
@pytest.mark.parametrize("query", QUERIES, ids=lambda q: q.name)
def test_dashboard_query_answers_for_each_instance(
    fleet: Fleet, query: PanelQuery, host_name: str
) -> None:
    host = fleet.hosts[host_name]
    expr = fill_variables(query.expr, host.instance)
    result = fleet.query(expr)
    if query.name in IDLE_RATIOS and not result:
        busy = fill_variables(expr.split(" / (", 1)[1].removesuffix(" > 0)"), host.instance)
        assert [float(s["value"][1]) for s in fleet.query(busy)] == [0], f"{expr}: busy"
        return
    assert result, f"no data for {host.name} ({host.instance}) from {expr}"
    if query.panel_title in SWAP_PANELS and not host.has_swap:
        assert [float(s["value"][1]) for s in result] == [0], f"{expr} on a host without swap"
    for series in result:
        assert series["metric"].get("instance", host.instance) == host.instance, series
        value = float(series["value"][1])
        assert math.isfinite(value), f"{expr} gave {value} for {series['metric']}"


def test_rules_are_loaded_and_healthy(fleet: Fleet) -> None:
    groups = get_json(f"{fleet.prometheus}/api/v1/rules")["data"]["groups"]
    assert [group["name"] for group in groups] == ["kvm_exporter"]
    assert groups[0]["file"] == str(RULES_FILE)
    rules = groups[0]["rules"]
    assert [rule["name"] for rule in rules] == [rule["alert"] for rule in alert_rules()]
    for rule in rules:
        assert rule["type"] == "alerting"
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
