"""node_exporter's names (``compat: [node_exporter]``): the same data as kvm_*, node_exporter's
conventions, the same HELP, types and values as the real node_exporter (Debian's
prometheus-node-exporter) on the same procfs, its textfile collector reading ``--once``, and
the process panels of Node Exporter Full answering on a real Prometheus that scrapes a
fake-FreeBSD exporter (the fake libkvm, tests/fakekvm)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import copy_proc_fixture, samples, wait_until
from fakelib import SCENARIOS, build_fake_libkvm, fake_libkvm  # noqa: F401 (fixture)
from prometheus_client.parser import text_string_to_metric_families
from test_exposition import run
from test_prometheus_fleet import (
    assert_panel_has_data,
    query,
    scraped_exporter,
    start_listening,
    stop,
)

from kvm_exporter.compat import NODE_HELP, STATE_LETTERS
from kvm_exporter.states import STATES

DB01 = SCENARIOS / "db01.scenario"
JOB = "node"

NODE_EXPORTER_FULL = {
    "Processes Status": [
        'node_procs_blocked{instance="$node",job="$job"}',
        'node_procs_running{instance="$node",job="$job"}',
    ],
    "Processes Detailed States": ['node_processes_state{instance="$node",job="$job"}'],
    "PIDs Number and Limit": [
        'node_processes_pids{instance="$node",job="$job"}',
        'node_processes_max_processes{instance="$node",job="$job"}',
    ],
    "Threads Number and Limit": [
        'node_processes_threads{instance="$node",job="$job"}',
        'node_processes_max_threads{instance="$node",job="$job"}',
    ],
}
"""The "System Processes" row of Node Exporter Full (grafana.com dashboard 1860), panel by
panel, with its template variables $node and $job."""

NOT_SERVED = {
    "Processes Forks": ['rate(node_forks_total{instance="$node",job="$job"}[$__rate_interval])']
}
"""The row's one panel kvm_exporter leaves empty: no source reads the fork counters."""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def once_text(config: str, env: dict[str, str] | None, tmp: Path) -> str:
    path = tmp / "kvm.yml"
    path.write_text(config)
    result = run("--once", f"--config.file={path}", env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def once(config: str, env: dict[str, str] | None, tmp: Path) -> Samples:
    return samples(once_text(config, env, tmp))


def libkvm_config(library: Path, extra: str = "") -> str:
    return f"source: libkvm\ninterval: 1h\nlibkvm:\n  library: {library}\n{extra}"


def fake_env() -> dict[str, str]:
    return {**os.environ, "FAKE_KVM_SCENARIO": str(DB01)}


def total(got: Samples, name: str) -> float:
    return sum(value for (metric, _), value in got.items() if metric == name)


def test_every_state_word_has_a_ps_letter() -> None:
    assert set(STATE_LETTERS) == set(STATES)
    assert all(len(letter) == 1 for letter in STATE_LETTERS.values())


def test_freebsd_host_serves_node_exporter_names_for_the_same_data(
    fake_libkvm: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    got = once(libkvm_config(fake_libkvm, "compat: [node_exporter]\n"), fake_env(), tmp_path)
    by_letter: dict[str, float] = {}
    for (name, labels), value in got.items():
        if name == "kvm_processes" and value:
            letter = STATE_LETTERS[dict(labels)["state"]]
            by_letter[letter] = by_letter.get(letter, 0) + value
    node_state = {
        dict(labels)["state"]: value
        for (name, labels), value in got.items()
        if name == "node_processes_state"
    }
    # Only letters that occur, as node_exporter does; db01 has every FreeBSD state.
    assert node_state == by_letter
    assert set(node_state) == {"R", "S", "I", "D", "L", "W", "T", "Z"}
    assert got[("node_processes_pids", frozenset())] == total(got, "kvm_processes")
    assert got[("node_processes_threads", frozenset())] == total(got, "kvm_threads")
    assert got[("node_processes_max_processes", frozenset())] == total(got, "kvm_processes_limit")
    assert got[("node_processes_max_threads", frozenset())] == total(got, "kvm_threads_limit")
    assert got[("node_procs_running", frozenset())] == node_state["R"]
    assert got[("node_procs_blocked", frozenset())] == node_state["D"]
    # node_exporter's loadavg collector serves these on FreeBSD: never a second source.
    assert not {name for name, _ in got if name in ("node_load1", "node_forks_total")}


def test_linux_host_leaves_out_what_node_exporter_serves_there(tmp_path: Path) -> None:
    got = once("source: procfs\ncompat: [node_exporter]\n", None, tmp_path)
    names = {name for name, _ in got if name.startswith("node_")}
    assert names == {
        "node_processes_pids",
        "node_processes_threads",
        "node_processes_state",
        "node_processes_max_processes",
        "node_processes_max_threads",
    }


# --- the real node_exporter ---

NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"
"""Debian's prometheus-node-exporter (tests/run.sh installs it); never its system service."""

Families = dict[str, tuple[str, str, Samples]]
"""Each family of an exposition by name: (HELP, type, samples)."""


def families(text: str, prefix: str) -> Families:
    return {
        family.name: (
            family.documentation,
            family.type,
            {(s.name, frozenset(s.labels.items())): s.value for s in family.samples},
        )
        for family in text_string_to_metric_families(text)
        if family.name.startswith(prefix)
    }


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


@contextmanager
def node_exporter(tmp: Path, *flags: str) -> Iterator[tuple[str, Path]]:
    """The real node_exporter on a free loopback port with only the collectors ``flags``
    turn on: (its /metrics URL, its log)."""
    assert os.access(NODE_EXPORTER, os.X_OK), "apt-get install prometheus-node-exporter"
    log = tmp / "node_exporter.log"
    started: list[subprocess.Popen[bytes]] = []

    def command(port: int) -> list[str]:
        listen = f"--web.listen-address=127.0.0.1:{port}"
        return [NODE_EXPORTER, listen, "--collector.disable-defaults", *flags]

    try:
        _, port = start_listening(
            "node_exporter",
            command,
            lambda base: bool(get(f"{base}/metrics")),
            dict(os.environ),
            log,
            started,
        )
        yield f"http://127.0.0.1:{port}/metrics", log
    finally:
        for process in started:
            stop(process)


def procfs_once(root: Path, tmp: Path) -> str:
    """``--once`` with node_exporter's names, read from the procfs at ``root``."""
    return once_text(
        f"source: procfs\ncompat: [node_exporter]\nprocfs:\n  root: {root}\n", None, tmp
    )


def test_linux_names_equal_node_exporters_own_on_the_same_procfs(tmp_path: Path) -> None:
    """Same HELP, type and samples as node_exporter's processes collector, the limits
    included (pid_max 32768 and threads-max 63704, not the task limit 32767)."""
    root = copy_proc_fixture(tmp_path / "proc")
    ours = families(procfs_once(root, tmp_path), "node_")
    with node_exporter(tmp_path, f"--path.procfs={root}", "--collector.processes") as (url, _):
        theirs = families(get(url), "node_processes_")
    assert set(ours) == set(theirs) - {"node_processes_threads_state"}
    assert {name: theirs[name] for name in ours} == ours
    assert ours["node_processes_max_processes"][2] == {
        ("node_processes_max_processes", frozenset()): 32768
    }


def test_every_node_help_is_node_exporters_own(
    fake_libkvm: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """FreeBSD's names too (node_procs_* from node_exporter's stat collector, on Linux)."""
    root = copy_proc_fixture(tmp_path / "proc")
    flags = (f"--path.procfs={root}", "--collector.processes", "--collector.stat")
    with node_exporter(tmp_path, *flags) as (url, _):
        theirs = families(get(url), "node_")
    config = libkvm_config(fake_libkvm, "compat: [node_exporter]\n")
    ours = families(once_text(config, fake_env(), tmp_path), "node_")
    assert set(ours) == set(NODE_HELP)
    assert {name: text for name, (text, _, _) in ours.items()} == {
        name: theirs[name][0] for name in ours
    }


LOG_MESSAGE = re.compile(r'msg="((?:[^"\\]|\\.)*)"')
TWICE = re.compile(r'\[from Gatherer #\d+\] collected metric "(\w+)" .* was collected before .*')


def gathering_errors(log: Path) -> list[str]:
    """Each error of node_exporter's "error gathering metrics" log lines."""
    errors = []
    for line in log.read_text().splitlines():
        found = LOG_MESSAGE.search(line)
        message = json.loads(f'"{found.group(1)}"') if found else ""
        if message.startswith("error gathering metrics"):
            errors += message.split("\n* ")[1:]
    return errors


@pytest.mark.parametrize("processes", [False, True], ids=["processes-off", "processes-on"])
def test_node_exporters_textfile_collector_takes_once(tmp_path: Path, processes: bool) -> None:
    """``--once`` in node_exporter's textfile directory: read without error, kvm_* served.
    With node_exporter's own processes collector on, the node_processes_* series come twice:
    node_exporter reports each as collected before, and nothing else (no HELP that differs)."""
    root = copy_proc_fixture(tmp_path / "proc")
    textfiles = tmp_path / "textfile"
    textfiles.mkdir()
    text = procfs_once(root, tmp_path)
    (textfiles / "kvm.prom").write_text(text)
    flags = [f"--path.procfs={root}", "--collector.textfile"]
    flags += [f"--collector.textfile.directory={textfiles}"]
    flags += ["--collector.processes"] if processes else []
    with node_exporter(tmp_path, *flags) as (url, log):
        get(url)
        served = samples(get(url))
    assert served[("node_textfile_scrape_error", frozenset())] == 0
    ours = samples(text)
    kvm = {key: value for key, value in ours.items() if key[0].startswith("kvm_processes")}
    assert kvm and {key: served.get(key) for key in kvm} == kvm
    node = {key: value for key, value in ours.items() if key[0].startswith("node_")}
    assert {key: served.get(key) for key in node} == node
    errors = gathering_errors(log)
    repeated = [m.group(1) for m in map(TWICE.fullmatch, errors) if m]
    assert len(repeated) == len(errors), errors  # no other error (a HELP unlike its own)
    assert set(repeated) == ({name for name, _ in node} if processes else set())


def test_without_compat_no_node_names_and_without_state_no_state_series(
    fake_libkvm: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    plain = once(libkvm_config(fake_libkvm), fake_env(), tmp_path)
    assert not [name for name, _ in plain if name.startswith("node_")]
    stateless = once(
        libkvm_config(fake_libkvm, "compat: [node_exporter]\nlabels: [user]\n"),
        fake_env(),
        tmp_path,
    )
    names = {name for name, _ in stateless if name.startswith("node_")}
    assert "node_processes_pids" in names
    assert not names & {"node_processes_state", "node_procs_running", "node_procs_blocked"}


def test_sighup_turns_the_names_on_and_off(
    exporter: Any,
    fake_libkvm: Path,  # noqa: F811
) -> None:
    e = exporter(libkvm_config(fake_libkvm), env={"FAKE_KVM_SCENARIO": str(DB01)})
    assert "node_processes_pids" not in e.get()
    for config, served in (("compat: [node_exporter]\n", True), ("", False)):
        e.config_path.write_text(libkvm_config(fake_libkvm, config))
        e.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda served=served: ("node_processes_pids" in e.get()) == served,
            what=f"node_* names served: {served}",
        )
    assert e.proc.poll() is None


def test_an_unknown_compat_name_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "kvm.yml"
    path.write_text("compat: [node]\n")
    result = run("--config.check", f"--config.file={path}")
    assert result.returncode == 1
    assert "compat: got ['node'], expected a list drawn from node_exporter" in result.stderr
    assert "Traceback" not in result.stderr


# --- Node Exporter Full on a real Prometheus ---


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(Prometheus URL, exporter instance): a fake-FreeBSD exporter with compat on, scraped
    every second as job "node"."""
    tmp = tmp_path_factory.mktemp("compat")
    config = tmp / "kvm.yml"
    config.write_text(libkvm_config(build_fake_libkvm(tmp), "compat: [node_exporter]\n"))
    with scraped_exporter(tmp, config, fake_env(), JOB) as scraped:
        yield scraped


def fill(expr: str, instance: str) -> str:
    filled = expr.replace("$node", instance).replace("$job", JOB)
    return filled.replace("$__rate_interval", "1m")


@pytest.mark.parametrize(
    "panel,expr",
    [(panel, expr) for panel, exprs in NODE_EXPORTER_FULL.items() for expr in exprs],
)
def test_node_exporter_full_process_panel_has_data(
    prometheus: tuple[str, str], panel: str, expr: str
) -> None:
    url, instance = prometheus
    assert_panel_has_data(url, panel, fill(expr, instance))


def test_node_exporter_full_states_panel_shows_freebsd_letters(
    prometheus: tuple[str, str],
) -> None:
    url, instance = prometheus
    result = query(url, fill(NODE_EXPORTER_FULL["Processes Detailed States"][0], instance))
    states = {s["metric"]["state"] for s in result}
    assert {"R", "S", "D", "T", "Z"} <= states  # the letters the dashboard names
    kvm = query(url, f"sum(kvm_processes{{instance={json.dumps(instance)}}})")
    node = query(url, f"sum(node_processes_state{{instance={json.dumps(instance)}}})")
    assert kvm[0]["value"][1] == node[0]["value"][1]


def test_node_exporter_full_forks_panel_stays_empty(prometheus: tuple[str, str]) -> None:
    url, instance = prometheus
    for exprs in NOT_SERVED.values():
        for expr in exprs:
            assert query(url, fill(expr, instance)) == []
