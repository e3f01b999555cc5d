"""The top processes on a live Linux: 30 real processes, each burning its own CPU rate and
holding its own memory, in a PID namespace of the test's own (its /proc shows them alone), read
by the exporter's procfs source and compared with what ps shows there."""

from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path

import pytest
from conftest import SYSTEM_PYTHON, wait_until

from kvm_exporter.config import TopConfig
from kvm_exporter.poller import Poller, Settings
from kvm_exporter.sources.procfs import ProcfsSource

N = 10
WINDOWS = 6
"""5 s windows tried at most, one after another, until one tells the busiest apart."""
MIB = 2**20
BURN = """\
import sys, time
rate, hold = float(sys.argv[1]), b"x" * int(sys.argv[2])
begun = time.monotonic()
while True:  # its CPU time kept at rate times the time since it began, however it is scheduled
    if time.process_time() >= rate * (time.monotonic() - begun):
        time.sleep(0.002)
"""
RATES = [0.001 * (i + 1) for i in range(20)] + [0.04 + 0.002 * i for i in range(10)]
"""CPU each process burns, in cores: 0.1% to 2%, and the ten busiest 4% to 5.8% (a gap that
a loaded host's scheduling noise does not cross)."""


def ps(init: str) -> dict[str, tuple[int, float]]:
    """(resident KiB, %CPU) of each process in the namespace, by its pid there, from ps."""
    out = subprocess.run(
        ["nsenter", "-t", init, "-p", "-m", "ps", "-e", "-o", "pid=,rss=,pcpu=,comm="],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rows = [line.split() for line in out.splitlines()]
    return {pid: (int(rss), float(cpu)) for pid, rss, cpu, comm in rows if comm != "ps"}


def ticks(root: str) -> dict[str, int]:
    """utime + stime of each process under procfs ``root``, by pid, as the kernel counts."""
    out = {}
    for stat in Path(root).glob("[0-9]*/stat"):
        fields = stat.read_text().rpartition(")")[2].split()
        out[stat.parent.name] = int(fields[11]) + int(fields[12])
    return out


def top_set(poller: Poller) -> set[str]:
    snap = poller.snapshot()
    assert snap.top is not None and snap.up
    return {process.labels[0] for process in snap.top.processes}


def test_the_top_sets_equal_ps_for_30_processes_of_known_use(namespace: str) -> None:
    memory = list(range(30))
    random.Random(22).shuffle(memory)  # the biggest users of CPU are not those of memory
    workers = [
        subprocess.Popen(
            ["nsenter", "-t", namespace, "-p", "-m", SYSTEM_PYTHON, "-c", BURN]
            + [str(rate), str((memory[i] + 1) * 3 * MIB)]
        )
        for i, rate in enumerate(RATES)
    ]
    try:
        root = f"/proc/{namespace}/root/proc"
        wait_until(lambda: len(ps(namespace)) == 31, what="30 workers")
        by_memory = Poller(ProcfsSource(root), Settings(top=TopConfig(N, ("memory",), 0)))
        time.sleep(3)  # past their start: each burns at its rate
        # The kernel's CPU ticks over the window the exporter saw (not ps's lifetime average,
        # which a loaded host's slow start-ups blur): the busiest must be in, the idlest out,
        # wherever the load left the rates; a tick either side of the cut may go either way.
        # A host busy enough to squeeze the rates together in one window gets another, with
        # a poller of its own (the sets' hysteresis would carry the last window's members).
        for _ in range(WINDOWS):
            by_cpu = Poller(ProcfsSource(root), Settings(top=TopConfig(N, ("cpu",), 0)))
            by_cpu.poll()  # the first poll is the baseline
            before = ticks(root)
            time.sleep(5)
            by_cpu.poll()
            used = {pid: n - before[pid] for pid, n in ticks(root).items() if pid in before}
            cut = sorted(used.values(), reverse=True)[N - 1]
            busiest = {pid for pid, n in used.items() if n > cut + 2}
            idlest = {pid for pid, n in used.items() if n < cut - 2}
            if len(busiest) + len(idlest) >= 2 * N:  # the window told most of them apart
                break
        else:
            pytest.fail(f"no window of {WINDOWS} told 2n of the 30 apart; the last: {used}")
        got = top_set(by_cpu)
        assert len(got) == N and len(used) == 31
        assert busiest <= got and not idlest & got
        by_memory.poll()
        truth = ps(namespace)
        top_memory = sorted(truth, key=lambda pid: -truth[pid][0])
        assert top_set(by_memory) == set(top_memory[:N])
        snap = by_memory.snapshot()
        assert snap.top is not None
        for process in snap.top.processes:  # read a moment apart, each as the kernel counts
            kib = truth[process.labels[0]][0]
            assert process.resident_bytes / 1024 == pytest.approx(kib, rel=0.01)
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
