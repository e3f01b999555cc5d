"""process-exporter's own dashboard (ncabatoff/process-exporter dashboards/procmain.jsonnet,
panels built by grproc.libsonnet's gntarget: ``sum by (groupname) (EXPR)``) on a real
Prometheus scraping kvm_exporter on a fake FreeBSD host with ``compat: [process_exporter]``:
the panels whose metrics both exporters serve have data; the others stay empty. On Linux
with ``groups.details``, its I/O and worst fd ratio panels have data too."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakelib import SCENARIOS, build_fake_libkvm, fixed_passwd
from prom_support import dashboard_queries, load_dashboard
from test_prometheus_fleet import (
    assert_panel_has_data,
    fill_variables,
    query,
    scraped_exporter,
)

INSTRE = 'instance=~"$instance"'
INSTGNRE = 'instance=~"$instance", groupname=~"$groupname"'
GROUPED = "sum by (groupname) (%s)"
SERVED = {
    "Num procs": GROUPED % f"namedprocess_namegroup_num_procs{{{INSTGNRE}}}",
    "Restarts": GROUPED
    % f"changes(namedprocess_namegroup_oldest_start_time_seconds{{{INSTGNRE}}}[$interval])",
    "Resident Memory": GROUPED
    % f'namedprocess_namegroup_memory_bytes{{{INSTGNRE}, memtype="resident"}}',
    "threads running": f'sum(namedprocess_namegroup_states{{{INSTRE}, state="Running"}})',
    "threads blocked": f'sum(namedprocess_namegroup_states{{{INSTRE}, state="Waiting"}})',
    "exporter errs": f"sum(namedprocess_scrape_errors{{{INSTRE}}})",
}
NOT_SERVED = {
    # The jsonnet's CPU panel names process-exporter's old cpu_user/cpu_system metrics, which
    # its 0.7 releases no longer serve either.
    "CPU": GROUPED
    % f"rate(namedprocess_namegroup_cpu_user_seconds_total{{{INSTGNRE}}}[$interval])",
    # FreeBSD has neither bytes (kinfo_proc counts block operations) nor a cheap count of
    # another process's descriptors; on Linux groups.details serves both (the last test).
    "I/O": GROUPED % f"rate(namedprocess_namegroup_read_bytes_total{{{INSTGNRE}}}[$interval])",
    "Worst FD Ratio": GROUPED % f"namedprocess_namegroup_worst_fd_ratio{{{INSTGNRE}}}",
}
CONFIG = """source: libkvm
interval: 1s
compat: [process_exporter]
libkvm:
  library: {library}
groups:
  process_names:
    - name: "{{{{.Comm}}}}"
      comm: [nginx, php-fpm, memcached, sshd, kernel]
"""


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(Prometheus URL, exporter instance), scraped every second."""
    tmp = tmp_path_factory.mktemp("pe-dashboard")
    config = tmp / "kvm.yml"
    config.write_text(CONFIG.format(library=build_fake_libkvm(tmp)))
    env = {**os.environ, "FAKE_KVM_SCENARIO": str(SCENARIOS / "web01.scenario")}
    env.update(fixed_passwd())
    with scraped_exporter(tmp, config, env, "process-exporter") as scraped:
        yield scraped


def fill(expr: str, instance: str) -> str:
    return (
        expr.replace("$instance", instance.replace(".", "\\\\."))
        .replace("$groupname", ".*")
        .replace("$interval", "1m")
    )


@pytest.mark.parametrize(("panel", "expr"), SERVED.items())
def test_process_exporter_dashboard_panel_has_data(
    prometheus: tuple[str, str], panel: str, expr: str
) -> None:
    url, instance = prometheus
    assert_panel_has_data(url, panel, fill(expr, instance))


def test_group_names_and_counts_reach_the_dashboard(prometheus: tuple[str, str]) -> None:
    url, instance = prometheus
    result = query(url, fill(SERVED["Num procs"], instance))
    got = {s["metric"]["groupname"]: float(s["value"][1]) for s in result}
    # web01's nginx and php-fpm masters with their workers; sshd: the daemon, a session's
    # sshd, and (-children) the shells, vim, su and top under them; pid 0's children (ppid 0)
    # join nothing, as process-exporter treats a parent pid below 1.
    assert got == {"kernel": 1, "nginx": 5, "php-fpm": 5, "memcached": 1, "sshd": 8}


@pytest.mark.parametrize(("panel", "expr"), NOT_SERVED.items())
def test_panels_of_metrics_not_served_stay_empty(
    prometheus: tuple[str, str], panel: str, expr: str
) -> None:
    url, instance = prometheus
    assert query(url, fill(expr, instance)) == [], panel


def test_template_variables_list_the_instance_and_groups(prometheus: tuple[str, str]) -> None:
    url, instance = prometheus
    series = query(
        url, f'count by (groupname) (namedprocess_namegroup_num_procs{{instance="{instance}"}})'
    )
    assert {s["metric"]["groupname"] for s in series} >= {"nginx", "kernel"}


def test_kvm_dashboards_cpu_per_group_is_process_exporters_cpu(
    prometheus: tuple[str, str],
) -> None:
    """The shipped dashboard's CPU panel of the named groups row shows, per group, what a
    process-exporter user's CPU panel (its cpu_seconds_total's rate, modes summed) shows."""
    url, instance = prometheus
    (expr,) = [
        q.expr for q in dashboard_queries(load_dashboard()) if q.panel_title == "CPU per group"
    ]
    ours = query(url, fill_variables(expr, instance))
    theirs = query(
        url,
        "sum by (instance, groupname) "
        f'(rate(namedprocess_namegroup_cpu_seconds_total{{instance="{instance}"}}[1m]))',
    )
    assert ours, expr
    assert {s["metric"]["group"]: s["value"][1] for s in ours} == {
        s["metric"]["groupname"]: s["value"][1] for s in theirs
    }


@pytest.mark.parametrize("panel", ["I/O", "Worst FD Ratio"])
def test_on_linux_the_details_fill_the_io_and_fd_panels(
    tmp_path: Path, panel: str, own_process: str
) -> None:
    """With ``groups.details: [io, fd]`` on Linux, the dashboard's I/O and Worst FD Ratio
    panels, empty on FreeBSD, have data."""
    config = tmp_path / "kvm.yml"
    config.write_text(
        "interval: 1s\ncompat: [process_exporter]\ngroups:\n  details: [io, fd]\n"
        f"  process_names: [{{name: mine, cmdline: ['{own_process}']}}]\n"
    )
    with scraped_exporter(tmp_path, config, dict(os.environ), "process-exporter") as scraped:
        url, instance = scraped
        assert_panel_has_data(url, panel, fill(NOT_SERVED[panel], instance))


@pytest.fixture
def own_process() -> Iterator[str]:
    """A process of the test's own, by a token in its command line."""
    token = "t" + secrets.token_hex(4)
    child = subprocess.Popen(["bash", "-c", f"exec -a {token} sleep 600"])
    try:
        yield token
    finally:
        child.kill()
        child.wait()
