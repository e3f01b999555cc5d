"""A process whose first thread exited while another runs (``pthread_exit`` in main): Linux
shows its PID/stat as a zombie with no memory and its cmdline as empty; the exporter reports
it by its live thread, in state, memory and naming. A real program, a real exporter."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until

from kvm_exporter.records import USAGE_PID, USAGE_RSS_PAGES, USAGE_STATE, USAGE_VSIZE
from kvm_exporter.sources import procfs

MIB = 2**20
LEADER_EXITS = r"""
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static char *volatile kept;
static void *spin(void *unused) {
    char *p = malloc(64 << 20);
    memset(p, 1, 64 << 20);
    kept = p;
    for (;;) {}
    return unused;
}
int main(void) {
    pthread_t t;
    pthread_create(&t, NULL, spin, NULL);
    sleep(1);
    pthread_exit(NULL);
}
"""
"""Touches 64 MiB and spins in a second thread; the first thread exits after a second."""


def thread_stat(pid: int) -> list[str]:
    tids = [t for t in os.listdir(f"/proc/{pid}/task") if t != str(pid)]
    data = Path(f"/proc/{pid}/task/{tids[0]}/stat").read_text()
    return data[data.rindex(")") + 2 :].split()


@pytest.fixture
def leader(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    source = tmp_path / "leader.c"
    source.write_text(LEADER_EXITS)
    binary = tmp_path / "leader"
    subprocess.run(["cc", "-O0", "-pthread", "-o", str(binary), str(source)], check=True)
    proc = subprocess.Popen([str(binary), "--app=leaderapp"])
    try:

        def exited_first() -> bool:
            stat = Path(f"/proc/{proc.pid}/stat").read_text()
            return stat[stat.rindex(")") + 2] == "Z" and int(thread_stat(proc.pid)[21]) > 0

        wait_until(exited_first, what="the first thread's exit")
        wait_until(lambda: int(thread_stat(proc.pid)[21]) * os.sysconf("SC_PAGE_SIZE") > 60 * MIB)
        assert Path(f"/proc/{proc.pid}/cmdline").read_bytes() == b""  # as the kernel shows it
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("compiled", [True, False])
def test_it_is_counted_by_its_live_thread(
    leader: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch, compiled: bool
) -> None:
    if not compiled:
        monkeypatch.setattr(procfs, "_lib", None)
    source = procfs.ProcfsSource()
    spec = source.usage_spec
    row = next(r for r in map(spec.decode, source.survey().usage) if r[USAGE_PID] == leader.pid)
    assert spec.state(row[USAGE_STATE]) == "running"  # not "zombie"
    assert row[USAGE_RSS_PAGES] * spec.page_size > 60 * MIB and row[USAGE_VSIZE] > 64 * MIB
    argv = source.argv(leader.pid)  # PID/cmdline is empty: the live thread's
    assert argv is not None and argv[1:] == ("--app=leaderapp",)


def test_it_is_named_by_its_arguments(leader: subprocess.Popen[bytes], exporter: Any) -> None:
    """Named at the first poll that sees it, after its first thread exited: its arguments
    come from the live thread."""
    config = """interval: 0
groups:
  process_names:
    - name: "{{.Matches.app}}"
      cmdline: ['--app=(?P<app>[a-z]+)']
"""
    metrics = exporter(config).metrics()
    group = frozenset({("group", "leaderapp")})
    assert metrics[("kvm_namegroup_processes", group)] == 1
    running = frozenset({("group", "leaderapp"), ("state", "running")})
    assert metrics[("kvm_namegroup_state_processes", running)] == 1
    assert metrics[("kvm_namegroup_resident_memory_bytes", group)] > 60 * MIB
