"""The real exporter process: exposition checked by promtool, golden files, CLI basics."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import copy_proc_fixture

HERE = Path(__file__).parent
GOLDEN = HERE / "golden" / "linux.prom"
VOLATILE = re.compile(
    r"^(kvm_poll_duration_seconds|kvm_last_successful_poll_timestamp_seconds"
    r"|kvm_config_last_reload_success_timestamp_seconds)\{?.*$",
    re.M,
)


def stable(exposition: str) -> str:
    """The exposition with values that change from run to run masked."""
    text = VOLATILE.sub(lambda m: m.group(0).rsplit(" ", 1)[0] + " <volatile>", exposition)
    return re.sub(r'python_version="[^"]*"', 'python_version="<python>"', text)


def run(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvm_exporter", *args],
        capture_output=True,
        text=True,
        timeout=60,
        **kw,
    )


def promtool_check(exposition: str) -> None:
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_live_metrics_pass_promtool(exporter: Any) -> None:
    e = exporter()
    text = e.get()
    promtool_check(text)
    for name in (
        "kvm_processes",
        "kvm_threads",
        "kvm_load1",
        "kvm_load5",
        "kvm_load15",
        "kvm_up 1.0",
        "kvm_exporter_build_info",
        "kvm_cpus",
        "kvm_polls_total",
    ):
        assert f"\n{name}" in text
    swaps = Path("/proc/swaps").read_text().splitlines()[1:]
    assert text.count("\nkvm_swap_size_bytes{") == len(swaps)
    om = e.get(headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert om.endswith("# EOF\n") and "# TYPE kvm_polls counter" in om
    assert '<a href="/metrics">' in e.get("/")


def test_once_matches_golden_linux_exposition(tmp_path: Path) -> None:
    config = tmp_path / "fixture.yml"
    config.write_text(f"procfs: {{root: {copy_proc_fixture(tmp_path / 'proc')}}}\n")
    result = run("--once", f"--config.file={config}")
    assert result.returncode == 0, result.stderr
    promtool_check(result.stdout)
    assert stable(result.stdout) == GOLDEN.read_text()


def test_once_exits_nonzero_when_a_part_fails(tmp_path: Path) -> None:
    root = tmp_path / "proc"
    root.mkdir()
    (root / "loadavg").write_text("0.1 0.2 0.3 1/1 1\n")
    config = tmp_path / "broken.yml"
    config.write_text(f"procfs: {{root: {root}}}\n")
    result = run("--once", f"--config.file={config}")
    assert result.returncode == 1
    assert "kvm_up 0.0" in result.stdout and "kvm_load1 0.1" in result.stdout
    assert f"poll of procs failed: {root} has no process directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_version_and_check() -> None:
    help_text = run("--help").stdout
    for flag in (
        "--config.file",
        "--web.listen-address",
        "--web.telemetry-path",
        "--web.config.file",
        "--log.level",
        "--config.check",
        "--once",
        "--libkvm.core",
    ):
        assert flag in help_text
    assert run("--version").stdout.startswith("kvm_exporter, version 0.1.0 (revision: ")
    check = run("--config.check", f"--config.file={HERE.parent / 'config/kvm_exporter.yml'}")
    assert check.returncode == 0 and "configuration is valid" in check.stdout


def test_taken_port_is_one_clear_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = run(f"--web.listen-address=127.0.0.1:{port}")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len([line for line in lines if "level=error" in line]) == 1
    assert f"127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr


def test_custom_telemetry_path(exporter: Any) -> None:
    e = exporter(None, "--web.telemetry-path=/kvm")
    assert "kvm_up" in e.get("/kvm")
    with pytest.raises(urllib.error.HTTPError) as err:
        e.get("/metrics")
    assert err.value.code == 404
