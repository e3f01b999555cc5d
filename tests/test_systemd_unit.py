"""config/kvm_exporter.service: systemd-analyze verify and security, its sandboxing keys, and
its ExecStart/ExecReload command lines run for real as nobody (systemd is not init here)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, free_port, samples, wait_until
from test_rcd import NOBODY, exporter_for_nobody

UNIT = REPO / "config" / "kvm_exporter.service"
INSTALLED_EXPORTER = "/usr/local/bin/kvm_exporter"


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file, each a list of (key, value) in order: keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


SERVICE = parse_unit(UNIT.read_text())["Service"]


def values(key: str) -> list[str]:
    return [value for k, value in SERVICE if k == key]


def value(key: str) -> str:
    found = values(key)
    assert len(found) == 1, f"{key}= set {len(found)} times"
    return found[0]


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = tmp_path / "kvm_exporter.service"
    shutil.copy(UNIT, unit)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kvm_exporter" not in result.stdout + result.stderr


def test_systemd_analyze_security_rates_it_ok(tmp_path: Path) -> None:
    unit = tmp_path / "kvm_exporter.service"
    shutil.copy(UNIT, unit)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    level = re.search(
        r"Overall exposure level for kvm_exporter\.service: ([\d.]+) (\w+)", result.stdout
    )
    assert level, result.stdout
    assert float(level.group(1)) <= 2.0 and level.group(2) == "OK", result.stdout


def test_sandboxing_keys() -> None:
    assert value("DynamicUser") == "yes"
    assert value("User") == "kvm_exporter"
    for key, setting in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateMounts": "yes",
        "DevicePolicy": "closed",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectClock": "yes",
        "ProtectHostname": "yes",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "Restart": "on-failure",
        "Type": "exec",
        "SyslogIdentifier": "kvm_exporter",
        "ExecReload": "/bin/kill -HUP $MAINPID",
    }.items():
        assert value(key) == setting, key
    # /proc must show every process and its real owner.
    assert value("ProtectProc") == "default"
    assert value("ProcSubset") == "all"
    assert not values("PrivateUsers")
    assert not values("PrivateDevices"), "a private /dev hides the tty names"
    assert "@system-service" in values("SystemCallFilter")


class Unit:
    """The unit's ExecStart and ExecReload lines, run as systemd would, as nobody."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.config = root / "kvm_exporter.yml"
        self.exporter = exporter_for_nobody(root)
        self.stderr_path = root / "stderr"
        self.proc: subprocess.Popen[bytes] | None = None

    def exec_start(self) -> list[str]:
        """ExecStart as argv: systemd's "$$" is a literal "$"; the binary is the test's."""
        line = value("ExecStart").replace("$$", "$")
        assert line.count(INSTALLED_EXPORTER) == 1
        return shlex.split(line.replace(INSTALLED_EXPORTER, str(self.exporter)))

    def start(self) -> int:
        env = {
            "PATH": "/usr/bin:/bin",
            "KVM_EXPORTER_CONFIG": str(self.config),
            "KVM_EXPORTER_ARGS": f"--web.listen-address=127.0.0.1:{self.port} --log.level=debug",
        }
        with open(self.stderr_path, "ab") as stderr:
            self.proc = subprocess.Popen(
                self.exec_start(),
                env=env,
                stderr=stderr,
                cwd="/",
                user=NOBODY,
                group=NOBODY,
                extra_groups=[NOBODY],
            )
        wait_until(lambda: "kvm_processes" in self.metrics(), timeout=20, what="/metrics")
        return self.proc.pid

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    def labels(self) -> set[str]:
        return {
            n for (m, labels) in samples(self.metrics()) if m == "kvm_processes" for n, _ in labels
        }

    def reload(self, mainpid: int) -> None:
        command = shlex.split(value("ExecReload").replace("$MAINPID", str(mainpid)))
        assert subprocess.run(command, timeout=10).returncode == 0

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)  # systemctl stop: KillSignal=SIGTERM
        return self.proc.wait(timeout=float(value("TimeoutStopSec").rstrip("s")))


@pytest.fixture
def unit() -> Iterator[Unit]:
    # Not tmp_path: pytest's base directory is closed to nobody, who reads the config.
    root = Path(tempfile.mkdtemp(prefix="kvm-unit-"))
    try:
        root.chmod(0o755)
        u = Unit(root)
        yield u
        if u.proc is not None and u.proc.poll() is None:
            u.proc.kill()
            u.proc.wait()
    finally:
        shutil.rmtree(root)


def test_exec_start_uses_the_config_and_reload_rereads_it(unit: Unit) -> None:
    unit.config.write_text("interval: 500ms\n")
    unit.config.chmod(0o644)
    mainpid = unit.start()
    # exec: the process systemd started is the exporter, so $MAINPID gets the signals.
    cmdline = Path(f"/proc/{mainpid}/cmdline").read_text().split("\0")
    assert str(unit.exporter) in cmdline
    assert f"--config.file={unit.config}" in cmdline
    assert f"--web.listen-address=127.0.0.1:{unit.port}" in cmdline
    assert Path(f"/proc/{mainpid}/status").read_text().count(f"Uid:\t{NOBODY}\t") == 1
    assert unit.labels() == {"user", "tty", "state"}

    unit.config.write_text("interval: 500ms\nlabels: [state]\n")
    unit.reload(mainpid)
    wait_until(lambda: unit.labels() == {"state"}, what="labels after ExecReload")
    assert unit.proc is not None and unit.proc.poll() is None
    assert unit.stop() == 0
    assert "configuration reloaded" in unit.stderr_path.read_text()


def test_exec_start_runs_on_defaults_without_the_config_file(unit: Unit) -> None:
    assert not unit.config.exists()
    mainpid = unit.start()
    cmdline = Path(f"/proc/{mainpid}/cmdline").read_text().split("\0")
    assert not [arg for arg in cmdline if arg.startswith("--config.file")]
    assert unit.labels() == {"user", "tty", "state"}
    assert unit.stop() == 0
    assert not os.path.exists(f"/proc/{mainpid}/cmdline")
