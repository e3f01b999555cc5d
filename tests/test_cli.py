"""The command line, run as a real process: --version, --help, the start-up log line, and the
flags that set what the file sets (repeated listen addresses, interval, labels, procfs, logs)."""

from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from conftest import copy_proc_fixture, free_port, samples, wait_until

import kvm_exporter


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvm_exporter", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )


def test_version_has_revision_python_and_platform() -> None:
    result = run("--version")
    assert result.returncode == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 3, lines
    first = re.fullmatch(r"kvm_exporter, version (\S+) \(revision: (\S+)\)", lines[0])
    assert first, lines[0]
    assert first.group(1) == kvm_exporter.__version__
    # The package under test is installed from a git checkout: the build recorded the commit.
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", first.group(2)), first.group(2)
    assert lines[1] == f"  python version:   {platform.python_version()} (CPython)"
    assert lines[2] == f"  platform:         {sys.platform}/{platform.machine()}"


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def checkout_version(repo: Path) -> str:
    """The revision ``python -m kvm_exporter --version`` run in ``repo`` prints."""
    result = subprocess.run(
        [sys.executable, "-m", "kvm_exporter", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=repo,
    )
    assert result.returncode == 0, result.stderr
    first = re.fullmatch(
        r"kvm_exporter, version \S+ \(revision: (\S+)\)", result.stdout.split("\n")[0]
    )
    assert first, result.stdout
    return first.group(1)


def test_version_run_from_a_checkout_says_its_commit(tmp_path: Path) -> None:
    """The source tree itself, not built (no recorded revision): git's commit, -dirty with
    changes to tracked files; a copy outside any checkout says unknown."""
    repo = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "revision.txt")
    shutil.copytree(Path(kvm_exporter.__file__).parent, repo / "kvm_exporter", ignore=ignore)
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "a commit")
    commit = git(repo, "rev-parse", "HEAD")
    assert checkout_version(repo) == commit
    with (repo / "kvm_exporter" / "states.py").open("a") as f:
        f.write("# a local change\n")
    assert checkout_version(repo) == commit + "-dirty"
    shutil.rmtree(repo / ".git")
    assert checkout_version(repo) == "unknown"


def test_help_lists_every_flag() -> None:
    text = " ".join(run("--help").stdout.split())
    for flag in (
        "--web.listen-address ADDRESS",
        "--path.procfs PATH",
        "--poll.interval DURATION",
        "--collector.labels LABELS",
        "--log.format FORMAT",
        "--version",
        "repeat the flag to listen on several",
    ):
        assert flag in text, flag


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def up(metrics: dict[Any, float]) -> dict[Any, float] | None:
    return metrics if metrics.get(("kvm_up", frozenset())) == 1 else None


def test_start_up_line_has_fields_and_each_address_serves(exporter: Any, tmp_path: Path) -> None:
    root = copy_proc_fixture(tmp_path / "proc")
    second = free_port()
    e = exporter(
        "interval: 15s\n",
        f"--web.listen-address=[::1]:{second}",
        f"--path.procfs={root}",
        "--poll.interval=1h30m",
        "--collector.labels=state",
    )
    for url in (e.url, f"http://[::1]:{second}"):
        metrics = wait_until(lambda u=url: up(samples(get(u + "/metrics"))), what=f"{url} up")
        groups = {labels for name, labels in metrics if name == "kvm_processes"}
        assert groups and all(dict(labels).keys() == {"state"} for labels in groups), url
    start = [line for line in e.stderr().splitlines() if 'msg="starting kvm_exporter"' in line]
    assert len(start) == 1, e.stderr()
    assert re.fullmatch(
        r'ts=\S+ level=info logger=kvm_exporter\.service msg="starting kvm_exporter" '
        rf"version={re.escape(kvm_exporter.__version__)} revision=[0-9a-f]{{40}}(-dirty)? "
        rf"source=procfs config={re.escape(str(e.config_path))} interval=1h30m",
        start[0],
    ), start[0]
    listening = re.findall(r'msg="listening" address=(\S+) tls=false', e.stderr())
    assert listening == [f"127.0.0.1:{e.port}", f"[::1]:{second}"]


def test_json_log_format(exporter: Any) -> None:
    e = exporter(None, "--log.format=json")
    e.get()
    lines = [json.loads(line) for line in e.stderr().splitlines()]
    start = next(line for line in lines if line["msg"] == "starting kvm_exporter")
    assert start["config"] == "none" and start["interval"] == "15s" and start["level"] == "info"
    assert {"ts", "logger", "version", "revision", "source"} <= start.keys()
    listening = [line["tls"] for line in lines if line["msg"] == "listening"]
    assert len(listening) == 1 and listening[0] is False  # a JSON boolean, not "false"
