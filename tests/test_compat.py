"""node_exporter's names (``compat: [node_exporter]``): the same data as kvm_*, node_exporter's
conventions, and the process panels of Node Exporter Full answering on a real Prometheus that
scrapes a fake-FreeBSD exporter (the fake libkvm, tests/fakekvm)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import samples, wait_until
from fakelib import SCENARIOS, build_fake_libkvm, fake_libkvm  # noqa: F401 (fixture)
from test_exposition import run
from test_prometheus_fleet import assert_panel_has_data, query, scraped_exporter

from kvm_exporter.compat import STATE_LETTERS
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


def once(config: str, env: dict[str, str] | None, tmp: Path) -> Samples:
    path = tmp / "kvm.yml"
    path.write_text(config)
    result = run("--once", f"--config.file={path}", env=env)
    assert result.returncode == 0, result.stderr
    return samples(result.stdout)


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
