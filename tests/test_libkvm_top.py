"""The top processes on the FreeBSD path: the libkvm source over the fake libkvm, 30 processes
whose CPU and memory the scenario sets, and a crash dump (memory only)."""

from __future__ import annotations

import os
import pathlib
import random

from fakelib import fake_libkvm  # noqa: F401 (fixture)
from test_libkvm_source import Opener, open_libkvm, write  # noqa: F401 (fixture)

from kvm_exporter.config import TopConfig
from kvm_exporter.poller import Poller, Settings
from kvm_exporter.top import TopProcesses

N = 10
HEAD = """\
sysctl hw.ncpu 4
sysctl hw.pagesize 4096
sysctl kern.maxproc 6000
sysctl kern.maxthread 100000
cp_time 100 0 50 5 1000
clockrate 100 10000 127 0
"""


def scenario(cpu_us: dict[int, int], rss: dict[int, int]) -> str:
    """``HEAD`` and one process per pid: its user and system time (half each) and pages."""
    return HEAD + "".join(
        f"proc pid={pid} ppid=1 uid=1001 stat=SRUN rss={rss[pid]} size={rss[pid] * 8192}"
        f" utime={cpu_us[pid] // 2} stime={cpu_us[pid] - cpu_us[pid] // 2}"
        f" start={1793000000 + pid}.25 comm=w{pid} argv=w{pid}|--secret=%0A{pid}\n"
        for pid in cpu_us
    )


def chosen(top: TopProcesses | None) -> set[int]:
    assert top is not None
    return {int(process.labels[0]) for process in top.processes}


def test_the_top_sets_equal_the_scenarios_fields(
    open_libkvm: Opener,  # noqa: F811
    tmp_path: pathlib.Path,
) -> None:
    rng = random.Random(22)
    pids = rng.sample(range(100, 60000), 30)
    cpu = {pid: rng.randrange(10**6, 10**9) for pid in pids}
    rss = dict(zip(pids, rng.sample(range(100, 100000), 30), strict=True))
    path = write(tmp_path, scenario(cpu, rss))
    source = open_libkvm(path)
    by_cpu = Poller(source, Settings(top=TopConfig(N, ("cpu",), 40)))
    by_memory = Poller(source, Settings(top=TopConfig(N, ("memory",), 0)))
    by_cpu.poll()
    grew = dict(zip(pids, rng.sample(range(0, 3 * 10**6, 1000), 30), strict=True))
    grew[pids[0]] = grew[pids[1]] = 0  # two used no CPU in the interval
    path.write_text(scenario({pid: cpu[pid] + grew[pid] for pid in pids}, rss))
    os.utime(path, (0, os.stat(path).st_mtime + 10))
    top = by_cpu.poll().top
    assert chosen(top) == set(sorted(pids, key=lambda pid: -grew[pid])[:N])
    assert chosen(by_memory.poll().top) == set(sorted(pids, key=lambda pid: -rss[pid])[:N])
    assert top is not None and top.labels == ("pid", "comm", "user", "cmdline")
    for process in top.processes:
        pid = int(process.labels[0])
        assert process.labels[1] == f"w{pid}"
        assert process.labels[3] == f"w{pid} --secret=\\x0a{pid}"  # no newline in a label
        assert process.resident_bytes == rss[pid] * 4096
        total = (cpu[pid] + grew[pid]) / 1e6
        assert sum(process.cpu_seconds.values()) == round(total, 6)
        assert process.start_time == 1793000000 + pid + 0.25


def test_a_crash_dump_has_a_memory_set_only(
    open_libkvm: Opener,  # noqa: F811
    tmp_path: pathlib.Path,
) -> None:
    rss = {pid: 1000 + pid for pid in range(2, 32)}
    path = write(tmp_path, scenario(dict.fromkeys(rss, 5 * 10**6), rss))
    dump = open_libkvm(None, kernel="/boot/kernel/kernel", core=str(path))
    snap = Poller(dump, Settings(top=TopConfig(3, ("cpu", "memory"), 0))).poll()
    assert snap.top is not None
    assert chosen(snap.top) == {31, 30, 29}
    for process in snap.top.processes:
        assert process.cpu_seconds == {} and process.start_time is None
        assert process.resident_bytes == rss[int(process.labels[0])] * 4096
