"""What FreeBSD's kernel puts in the usage a poll reads, through the fake libkvm: reaped
children's usage (ki_rusage_ch and a zombie's own), exited threads, clock steps, and the
host's counters (kern.cp_time, kern.clockrate, vm.stats.vm). tests/fakekvm/README.md cites
the kernel function behind each."""

from __future__ import annotations

import errno
import os
import pathlib
import time
from typing import Any

import pytest
from fakelib import HOST_COUNTERS, fake_libkvm  # noqa: F401 (fixture)
from test_libkvm_source import Opener, open_libkvm, write  # noqa: F401 (fixture)

from kvm_exporter.groups.rules import parse_process_names
from kvm_exporter.poller import Poller, Settings
from kvm_exporter.records import (
    USAGE_COUNTERS,
    USAGE_PID,
    USAGE_RSS_PAGES,
    USAGE_STATE,
    USAGE_VSIZE,
    HostUsage,
    SourceError,
)
from kvm_exporter.sources.kvm_cdef import ffi
from kvm_exporter.sources.libkvm import KERN_PROC_INC_THREAD, KERN_PROC_OPS

OWN = slice(USAGE_COUNTERS, USAGE_COUNTERS + 10)
CHILDREN = slice(USAGE_COUNTERS + 10, USAGE_COUNTERS + 20)

FAMILY = """\
proc pid=20 ppid=1 stat=SZOMB comm=make runtime=3000000 utime=2000000 stime=1000000 \
minflt=100 nvcsw=10 ch_utime=7000000 ch_stime=3500000 ch_minflt=900 ch_nvcsw=50 ch_inblock=4
proc pid=21 ppid=1 stat=SSLEEP comm=sh utime=1000000 ch_utime=250000 ch_majflt=3
"""


HOST = (
    "sysctl hw.pagesize 4096\nsysctl hw.ncpu 2\n"
    "sysctl kern.maxproc 6000\nsysctl kern.maxthread 12000\n"
)


def host_file(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    """A scenario of ``text`` on a host with 4 KiB pages, 2 CPUs and its limits."""
    return write(tmp_path, HOST + text)


def rewrite(scenario: pathlib.Path, text: str) -> None:
    """The host as ``text`` from now on: the fake reads a changed file again."""
    scenario.write_text(HOST + text)
    os.utime(scenario, (time.time() + 5, time.time() + 5))


def rows_by_pid(source: Any) -> dict[int, Any]:
    return {row[USAGE_PID]: row for row in map(source.usage_spec.decode, source.survey().usage)}


def test_a_zombie_holds_its_reaped_childrens_usage(
    open_libkvm: Opener,  # noqa: F811
    tmp_path: pathlib.Path,
) -> None:
    """exit1() adds p_cru into p_ru once PRS_ZOMBIE, and fill_kinfo_proc_only fills ki_rusage
    and ki_runtime with no zombie check; ki_rusage_ch gets only times (calccru writes
    ki_childutime/ki_childstime), its counts stay 0, live or zombie."""
    source = open_libkvm(host_file(tmp_path, FAMILY))
    rows = rows_by_pid(source)
    # utime s, us, stime s, us, minflt, majflt, nvcsw, nivcsw, inblock, oublock
    assert rows[20][OWN] == (9, 0, 4, 500000, 1000, 0, 60, 0, 4, 0)
    assert rows[20][CHILDREN] == (7, 0, 3, 500000, 0, 0, 0, 0, 0, 0)
    assert rows[21][OWN] == (1, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    assert rows[21][CHILDREN] == (0, 250000, 0, 0, 0, 0, 0, 0, 0, 0)
    cpu = {proc.pid: proc.cpu_seconds for proc in source.procs()}
    assert cpu[20] == 3.0 + 10.5  # ruadd adds the children's rux_runtime as well


def test_a_reaper_gains_its_childs_final_totals(
    open_libkvm: Opener,  # noqa: F811
    tmp_path: pathlib.Path,
) -> None:
    """proc_reap() runs ruadd(&q->p_stats->p_cru, .., &p->p_ru, ..): the parent's children's
    times grow by the child's own plus what the child had reaped. A live handle reads its
    scenario again when the file changes (the host moved on)."""
    scenario = host_file(
        tmp_path,
        "proc pid=30 ppid=1 stat=SSLEEP comm=sh ch_utime=100000\n"
        "proc pid=31 ppid=30 stat=SRUN comm=cc utime=4000000 stime=1000000 ch_utime=500000\n",
    )
    source = open_libkvm(scenario)
    assert rows_by_pid(source)[30][CHILDREN][:4] == (0, 100000, 0, 0)
    rewrite(scenario, "proc pid=30 ppid=1 stat=SSLEEP comm=sh ch_utime=4600000 ch_stime=1000000\n")
    rows = rows_by_pid(source)
    assert list(rows) == [30]
    assert rows[30][CHILDREN] == (4, 600000, 1, 0, 0, 0, 0, 0, 0, 0)


THREADED = (
    "proc pid=40 ppid=1 stat=SRUN comm=srv threads=2 runtime=14000000 utime=10000000 "
    "stime=4000000 minflt=1000 exited_utime=6000000 exited_stime=2000000 exited_minflt=600\n"
)


def test_exited_threads_usage_is_in_the_process_row_only(
    open_libkvm: Opener,  # noqa: F811
    tmp_path: pathlib.Path,
) -> None:
    """thread_exit() folds the thread's td_ru into p_ru (rucollect); thread rows carry
    rufetchtd() of each live thread. So the thread rows add up to less than the process,
    and the threads mode takes its counters from process rows."""
    scenario = host_file(tmp_path, THREADED)
    source = open_libkvm(scenario, threads=True)
    count = ffi.new("int *")
    with source._lock:
        op = KERN_PROC_OPS["proc"] | KERN_PROC_INC_THREAD
        base = source._lib.kvm_getprocs(source._kd, op, 0, count)
        records = ffi.cast("struct kinfo_proc_lp64 *", base)
        threads = [records[i].ki_rusage for i in range(count[0])]
        utime = sum(ru.ru_utime.tv_sec * 10**6 + ru.ru_utime.tv_usec for ru in threads)
        minflt = sum(ru.ru_minflt for ru in threads)
    assert (count[0], utime, minflt) == (2, 4000000, 400)
    row = rows_by_pid(source)[40]
    assert row[OWN] == (10, 0, 4, 0, 1000, 0, 0, 0, 0, 0)
    assert row == rows_by_pid(open_libkvm(scenario))[40]  # the same as without threads


def host(boot: float) -> str:
    return (
        f"boottime {boot}\n"
        f"proc pid=50 ppid=1 uid=0 stat=SSLEEP comm=app utime=5000000 start={boot + 900.5} "
        "argv=app|--name=alpha\n"
        f"proc pid=51 ppid=1 uid=0 stat=SSLEEP comm=app utime=1000000 start={boot + 950.25} "
        "argv=app|--name=beta\n"
    )


def test_a_clock_step_renames_no_process(
    open_libkvm: Opener,  # noqa: F811
    tmp_path: pathlib.Path,
) -> None:
    """tc_setclock() steps the clock by moving boottime, and ki_start is p_start plus
    getboottime(): every start moves with it. Starts read relative to kern.boottime stay
    put: no process is new, no counter jumps, no group is named again (argv changed but is
    not read again, as for any process seen before)."""
    boot = time.time() - 1000  # processes started 100 and 50 s ago
    scenario = host_file(tmp_path, host(boot))
    source = open_libkvm(scenario)
    rules = parse_process_names([{"name": "{{.Matches.n}}", "cmdline": ["--name=(?P<n>\\w+)"]}])
    poller = Poller(source, Settings(groups=rules))
    first = poller.poll()
    assert first.groups is not None and first.groups.processes == {"alpha": 1, "beta": 1}
    stepped = host(boot + 3600).replace("alpha", "gamma").replace("beta", "delta")
    rewrite(scenario, stepped)
    second = poller.poll()
    assert second.groups is not None and second.groups.processes == {"alpha": 1, "beta": 1}
    assert second.groups.counters == first.groups.counters
    assert second.resources is not None and first.resources is not None
    assert second.resources.counters == first.resources.counters
    # The oldest start in epoch seconds: boottime (as now read) plus the start since boot.
    assert second.groups.oldest_start["alpha"] == pytest.approx(boot + 3600 + 900.5)
    assert first.groups.oldest_start["alpha"] == pytest.approx(boot + 900.5)


HOST_USAGE = HOST_COUNTERS + "counter vm.stats.vm.v_kthreads 70\n"


def test_host_usage_from_cp_time_clockrate_and_vm_stats(
    open_libkvm: Opener,  # noqa: F811
    tmp_path: pathlib.Path,
) -> None:
    """kern.cp_time in stathz ticks (kern.clockrate), node_exporter's mode names; faults
    needing I/O are the major ones; forks are fork + vfork + rfork, not kernel threads."""
    source = open_libkvm(host_file(tmp_path, HOST_USAGE))
    assert source.host_usage() == HostUsage(
        cpu_seconds={"user": 20.0, "nice": 1.0, "system": 10.0, "interrupt": 2.0, "idle": 100.0},
        page_faults={"minor": 49700, "major": 300},
        forks=4210,
    )


def test_host_usage_names_the_missing_sysctl(
    open_libkvm: Opener,  # noqa: F811
    tmp_path: pathlib.Path,
) -> None:
    source = open_libkvm(host_file(tmp_path, HOST_USAGE.replace("counter vm.stats.vm.v_io", "#")))
    with pytest.raises(SourceError, match=r"^sysctl vm.stats.vm.v_io_faults: No such file"):
        source.host_usage()
    dump = open_libkvm(None, kernel="/boot/kernel/kernel", core=str(host_file(tmp_path, "")))
    assert dump.host_usage() == HostUsage({}, {}, None)


def test_the_fakes_sysctls_are_as_strict_as_freebsds(
    fake_libkvm: pathlib.Path,  # noqa: F811
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SYSCTL_OUT into a short buffer is ENOMEM (kern.cp_time: long[5], kern.clockrate:
    struct clockinfo by sysctl_handle_opaque, kern.boottime: struct timeval); a vm_cnt
    counter is 8 bytes, or truncated into exactly 4 (sysctl_handle_vmstat, COMPAT_FREEBSD11)."""
    scenario = host_file(tmp_path, HOST_USAGE + "boottime 1700000000.5\ncounter vm.x 4294967301\n")
    monkeypatch.setenv("FAKE_KVM_SCENARIO", str(scenario))
    lib = ffi.dlopen(str(fake_libkvm))

    def read(name: bytes, size: int) -> tuple[int, bytes]:
        buffer, length = ffi.new("char[]", 64), ffi.new("size_t *", size)
        ffi.errno = 0
        got = lib.sysctlbyname(name, buffer, length, ffi.NULL, 0)
        return (got if got == 0 else -ffi.errno), ffi.buffer(buffer, length[0])[:]

    for name, size in ((b"kern.cp_time", 40), (b"kern.clockrate", 20), (b"kern.boottime", 16)):
        assert read(name, size - 4)[0] == -errno.ENOMEM
        assert read(name, size)[0] == 0 and len(read(name, size)[1]) == size
    assert read(b"kern.boottime", 16)[1] == (1700000000).to_bytes(8, "little") + (500000).to_bytes(
        8, "little"
    )
    assert read(b"vm.x", 8) == (0, (4294967301).to_bytes(8, "little"))
    assert read(b"vm.x", 4) == (0, (5).to_bytes(4, "little"))
    assert read(b"vm.x", 6)[0] == -errno.ENOMEM


def test_a_process_whose_first_thread_exited_is_its_live_thread(
    open_libkvm: Opener,  # noqa: F811
    tmp_path: pathlib.Path,
) -> None:
    """Unlike Linux (tests/test_live_leader.py), FreeBSD shows no zombie for it: thread_exit()
    unlinks the exiting thread from p_threads (kern_thread.c thread_unlink), fill_kinfo_proc
    takes ki_stat from FIRST_THREAD_IN_PROC (kern_proc.c), the first live one; the memory is
    the process's vmspace and the arguments its p_args, and the exited thread's usage is in
    p_ru (thread_exit's rucollect)."""
    scenario = host_file(
        tmp_path,
        "proc pid=60 ppid=1 uid=0 stat=SRUN threads=1 rss=16384 size=134217728 comm=leader "
        "utime=3000000 exited_utime=1000000 argv=leader|--app=x\n",
    )
    source = open_libkvm(scenario, threads=True)
    row = rows_by_pid(source)[60]
    assert source.usage_spec.state(row[USAGE_STATE]) == "running"
    assert (row[USAGE_RSS_PAGES], row[USAGE_VSIZE], row[OWN][:2]) == (16384, 134217728, (3, 0))
    assert source.argv(60) == ("leader", "--app=x")
