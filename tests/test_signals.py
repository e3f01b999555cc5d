"""Signals on a real running exporter: SIGHUP reloads, SIGTERM/SIGINT stop cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, wait_until

from kvm_exporter.logs import EXIT_CRASH


def user_labelled(metrics: dict[Any, float]) -> bool:
    return any(n == "kvm_processes" and "user" in dict(lb) for (n, lb) in metrics)


def value(metrics: dict[Any, float], name: str) -> float:
    return metrics[(name, frozenset())]


def test_good_reload_changes_what_is_served(exporter: Any) -> None:
    e = exporter("interval: 1h\n")
    assert user_labelled(e.metrics())
    before = value(e.metrics(), "kvm_config_last_reload_success_timestamp_seconds")
    e.config_path.write_text("interval: 1h\nlabels: [state]\n")
    e.proc.send_signal(signal.SIGHUP)
    # A reload polls at once with the new settings; no need to wait for the hour.
    wait_until(lambda: not user_labelled(e.metrics()), what="reloaded label set")
    metrics = e.metrics()
    assert value(metrics, "kvm_config_last_reload_successful") == 1
    assert value(metrics, "kvm_config_last_reload_success_timestamp_seconds") > before
    assert metrics[("kvm_processes", frozenset({("state", "zombie")}))] >= 0
    assert "configuration reloaded" in e.stderr()


@pytest.mark.parametrize(
    "bad",
    ["labels: [pid]\n", "interval: [\n", "source: libkvm\nlibkvm: {library: /nonexistent.so}\n"],
)
def test_bad_reload_keeps_serving_old_config(exporter: Any, bad: str) -> None:
    e = exporter("interval: 1h\nlabels: [user, state]\n")
    e.config_path.write_text(bad)
    e.proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: value(e.metrics(), "kvm_config_reload_failures_total") == 1,
        what="failed reload to be counted",
    )
    metrics = e.metrics()
    assert value(metrics, "kvm_config_last_reload_successful") == 0
    assert value(metrics, "kvm_up") == 1
    assert user_labelled(metrics)  # still the old label set
    errors = [line for line in e.stderr().splitlines() if "level=error" in line]
    assert len(errors) == 1 and "still serving the previous configuration" in errors[0]
    assert "Traceback" not in e.stderr()
    # A fixed config then loads and clears the failure flag; the counter keeps its count.
    e.config_path.write_text("interval: 1h\nlabels: [state]\n")
    e.proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: value(e.metrics(), "kvm_config_last_reload_successful") == 1,
        what="good reload after a bad one",
    )
    assert value(e.metrics(), "kvm_config_reload_failures_total") == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signals_exit_zero_within_two_seconds(exporter: Any, signum: int) -> None:
    e = exporter("interval: 1s\n")
    e.get()
    start = time.monotonic()
    e.proc.send_signal(signum)
    assert e.proc.wait(timeout=5) == 0
    assert time.monotonic() - start < 2.0
    assert "shutting down" in e.stderr() and "Traceback" not in e.stderr()


# A fault no configuration can cause (the poller and reload turn every foreseen failure into a
# failed part or a failed reload): a bug, injected into the real process by a wrapper script,
# with no hook in the exporter itself.
FAULTS = {
    # part: (module, attribute that fails, calls that succeed first, message, signal to send)
    "poller": ("kvm_exporter.poller", "Poller.poll", 1, "the poller thread", None),
    "reload": ("kvm_exporter.service", "load_config", 1, "reload", signal.SIGHUP),
    "start-up": ("kvm_exporter.service", "open_source", 0, "start-up", None),
}

WRAPPER = """\
import importlib, sys
module = importlib.import_module({module!r})
owner, _, name = {attr!r}.rpartition(".")
owner = getattr(module, owner) if owner else module
real, calls = getattr(owner, name), []
def faulty(*args, **kwargs):
    calls.append(1)
    if len(calls) > {after}:
        raise RuntimeError("injected fault")
    return real(*args, **kwargs)
setattr(owner, name, faulty)
from kvm_exporter.cli import main
sys.exit(main())
"""


@pytest.mark.parametrize("part", FAULTS)
def test_an_unexpected_error_is_logged_once_and_exits_for_the_supervisor(
    tmp_path: Path, part: str
) -> None:
    module, attr, after, what, signum = FAULTS[part]
    log = tmp_path / "stderr"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRAPPER.format(module=module, attr=attr, after=after),
                f"--web.listen-address=127.0.0.1:{free_port()}",
                "--poll.interval=200ms",
            ],
            stderr=stderr,
            cwd="/",
        )
    try:
        if after:
            wait_until(lambda: "listening" in log.read_text(), what="start-up")
        if signum is not None:
            proc.send_signal(signum)
        assert proc.wait(timeout=10) == EXIT_CRASH
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = log.read_text().splitlines()
    assert all(line.startswith("ts=") for line in lines), lines  # nothing raw on stderr
    errors = [line for line in lines if "level=error" in line]
    assert len(errors) == 1, lines
    says = f"{what} failed unexpectedly: exiting so that the supervisor restarts kvm_exporter"
    assert f'msg="{says}"' in errors[0]
    assert ' exc="Traceback (most recent call last):\\n' in errors[0]
    assert errors[0].endswith('RuntimeError: injected fault"')
