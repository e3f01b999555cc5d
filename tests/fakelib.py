"""Build the fake libkvm (``tests/fakekvm/fakekvm.c``) with ``cc``; a fixture builds it once.

Other test modules use it with ``from fakelib import fake_libkvm``.
"""

from __future__ import annotations

import os
import pathlib
import subprocess

import pytest

FAKEKVM_DIR = pathlib.Path(__file__).resolve().parent / "fakekvm"
SCENARIOS = FAKEKVM_DIR / "scenarios"
FAKEPASSWD_DIR = pathlib.Path(__file__).resolve().parent / "fakepasswd"
SCENARIO_USERS = {0: "root", 1: "daemon", 33: "www-data", 65534: "nobody"}
"""The accounts the scenarios' exporters see; their other uids (770, 1001) have none."""
CFLAGS = ["-O2", "-Wall", "-Werror", "-shared", "-fPIC"]
HOST_COUNTERS = """\
cp_time 2540 127 1270 254 12700
clockrate 1000 1000 127 8128
counter vm.stats.vm.v_vm_faults 50000
counter vm.stats.vm.v_io_faults 300
counter vm.stats.vm.v_forks 4000
counter vm.stats.vm.v_vforks 200
counter vm.stats.vm.v_rforks 10
"""
"""Scenario lines for the host counters every FreeBSD kernel has (kern_clock.c
sysctl_kern_cp_time and sysctl_kern_clockrate, vm_meter.c's vm.stats.vm counters)."""


def build_fake_libkvm(out_dir: pathlib.Path) -> pathlib.Path:
    """Compile the fake into ``out_dir/libfakekvm.so`` and return its path."""
    out = out_dir / "libfakekvm.so"
    cmd = ["cc", *CFLAGS, "-o", str(out), str(FAKEKVM_DIR / "fakekvm.c")]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr}")
    return out


@pytest.fixture(scope="session")
def fake_libkvm(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Path of the fake libkvm shared library, built once per test session."""
    return build_fake_libkvm(tmp_path_factory.mktemp("fakekvm"))


def fixed_passwd(users: dict[int, str] = SCENARIO_USERS) -> dict[str, str]:
    """Environment for an exporter process whose password database is ``users`` alone
    (``fakepasswd/sitecustomize.py``), whatever accounts the host has."""
    path = os.pathsep.join(filter(None, [str(FAKEPASSWD_DIR), os.environ.get("PYTHONPATH")]))
    table = ",".join(f"{uid}:{name}" for uid, name in users.items())
    return {"PYTHONPATH": path, "FAKE_PASSWD": table}
