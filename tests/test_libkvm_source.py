"""The libkvm source through the real cffi path, against the fake libkvm (tests/fakekvm)."""

from __future__ import annotations

import pathlib
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fakelib import HOST_COUNTERS, SCENARIOS, fake_libkvm  # noqa: F401 (fixture)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvm_exporter.config import LibkvmConfig
from kvm_exporter.records import (
    NO_TTY,
    UNKNOWN_TTY,
    Census,
    HostLimits,
    LoadAvg,
    Proc,
    SourceError,
    SwapDevice,
    census_of,
)
from kvm_exporter.sources import kvm_cdef, libkvm
from kvm_exporter.sources.kvm_cdef import KINFO_PROC_TYPES, ffi
from kvm_exporter.sources.libkvm import LibkvmSource
from kvm_exporter.states import MAXSLP, freebsd_state

WEB01 = SCENARIOS / "web01.scenario"
DB01 = SCENARIOS / "db01.scenario"
SMALL = (
    """\
sysctl hw.pagesize 4096
sysctl hw.ncpu 2
sysctl kern.maxproc 1000
sysctl kern.maxthread 20000
loadavg 1.5 1.25 1.0
swap ada0p3 10 100
swap ada1p3 20 200
proc pid=1 uid=0 stat=SSLEEP tdflags=0x8 slptime=30 rss=10 size=4096 comm=init
proc pid=2 ppid=1 uid=33 stat=SRUN threads=3 rss=5 size=8192 runtime=1000001 comm=worker
"""
    + HOST_COUNTERS
)

Opener = Callable[..., LibkvmSource]


@pytest.fixture
def open_libkvm(
    fake_libkvm: pathlib.Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Opener]:
    """Opens LibkvmSource on the fake; FAKE_KVM_SCENARIO names ``scenario``."""
    opened: list[LibkvmSource] = []
    monkeypatch.delenv("FAKE_KVM_SCENARIO", raising=False)

    def open_(scenario: pathlib.Path | None = None, **config: Any) -> LibkvmSource:
        if scenario is not None:
            monkeypatch.setenv("FAKE_KVM_SCENARIO", str(scenario))
        source = LibkvmSource(LibkvmConfig(library=str(fake_libkvm), **config))
        opened.append(source)
        return source

    yield open_
    for source in opened:
        source.close()


def write(tmp_path: pathlib.Path, text: str, name: str = "test.scenario") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def scenario_procs(path: pathlib.Path) -> dict[int, dict[str, str]]:
    """The ``proc`` lines of a scenario, parsed independently of the fake, but for SIDL
    ones: a process still being created (PRS_NEW) is skipped by the kernel's
    proc_iterate and by libkvm's kvm_proclist alike."""
    procs = {}
    for line in path.read_text().splitlines():
        if line.startswith("proc "):
            fields = dict(item.split("=", 1) for item in line.split()[1:])
            if fields.get("stat") != "SIDL":
                procs[int(fields["pid"])] = fields
    return procs


def scenario_ttys(path: pathlib.Path) -> dict[int, str]:
    lines = [line.split() for line in path.read_text().splitlines()]
    return {int(words[1], 0): words[2] for words in lines if words and words[0] == "tty"}


@pytest.mark.parametrize("scenario", [WEB01, DB01], ids=["web01", "db01"])
def test_records_match_the_scenario(open_libkvm: Opener, scenario: pathlib.Path) -> None:
    expected = scenario_procs(scenario)
    ttys = scenario_ttys(scenario)
    procs = open_libkvm(scenario).procs()
    assert [p.pid for p in procs] == list(expected)
    for proc in procs:
        fields = expected[proc.pid]
        uid = int(fields["uid"])
        tdev = fields.get("tdev", "none")
        assert proc.ppid == int(fields["ppid"])
        assert proc.uid == uid
        assert proc.ruid == int(fields.get("ruid", uid))
        assert proc.tty == (NO_TTY if tdev == "none" else ttys[int(tdev, 0)])
        assert proc.comm == fields["comm"]
        assert proc.threads == int(fields.get("threads", 1))
        assert proc.rss_bytes == int(fields["rss"]) * 4096
        assert proc.vsize_bytes == int(fields["size"])
        assert proc.cpu_seconds == pytest.approx(int(fields["runtime"]) / 1e6)
        assert proc.start_time == pytest.approx(float(fields["start"]), abs=1e-6)


def test_web01_states_and_terminals(open_libkvm: Opener) -> None:
    procs = open_libkvm(WEB01).procs()
    assert Counter(p.state for p in procs) == {
        "sleeping": 11,
        "idle": 7,
        "uninterruptible": 4,
        "running": 4,
        "waiting": 1,
        "lock": 1,
        "zombie": 1,
        "stopped": 1,
    }
    assert Counter(p.tty for p in procs) == {
        NO_TTY: 22,
        "pts/0": 4,
        "pts/1": 2,
        "ttyv0": 1,
        "ttyv1": 1,
    }
    assert [p for p in procs if p.pid == 1230] == [
        Proc(
            pid=1230,
            ppid=1201,
            uid=1001,
            ruid=1001,
            tty="pts/0",
            state="stopped",
            comm="vim",
            threads=1,
            rss_bytes=1900 * 4096,
            vsize_bytes=24100864,
            cpu_seconds=0.21,
            start_time=1795841000.0,
        )
    ]


def test_load_swap_and_limits(open_libkvm: Opener) -> None:
    db01 = open_libkvm(DB01)
    assert db01.loadavg() == LoadAvg(3.15, 2.87, 2.40)
    gib4 = 4194304 * 4096
    assert db01.swap() == [
        SwapDevice("/dev/nvd0p3", gib4, 131072 * 4096),
        SwapDevice("/dev/nvd1p3", gib4, 129500 * 4096),
    ]
    assert db01.limits() == HostLimits(
        cpus=16, max_procs=32724, max_threads=1000000, memory_bytes=68624740352
    )


def test_page_size_comes_from_hw_pagesize(open_libkvm: Opener, tmp_path: pathlib.Path) -> None:
    source = open_libkvm(write(tmp_path, SMALL.replace("hw.pagesize 4096", "hw.pagesize 16384")))
    assert [p.rss_bytes for p in source.procs()] == [10 * 16384, 5 * 16384]
    assert source.swap()[0] == SwapDevice("/dev/ada0p3", 100 * 16384, 10 * 16384)


@pytest.mark.parametrize(
    "predicate, argument, pids",
    [
        ("pid", 1201, [1201]),
        ("pgrp", 1230, [1230]),
        ("session", 1201, [1201, 1230, 1244, 1245]),
        ("tty", 0x95, [1201, 1230, 1244, 1245]),
        ("uid", 1001, [1200, 1201, 1230]),
        ("ruid", 1001, [1200, 1201, 1230, 1244]),
    ],
)
def test_predicates(open_libkvm: Opener, predicate: str, argument: int, pids: list[int]) -> None:
    source = open_libkvm(WEB01, predicate=predicate, argument=argument)
    assert [p.pid for p in source.procs()] == pids


def test_a_pid_that_is_gone_gives_no_rows_not_an_error(open_libkvm: Opener) -> None:
    assert open_libkvm(WEB01, predicate="pid", argument=99999).procs() == []


def test_a_predicate_without_its_argument_is_refused(open_libkvm: Opener) -> None:
    with pytest.raises(SourceError, match="libkvm.predicate 'uid' .* set libkvm.argument"):
        open_libkvm(WEB01, predicate="uid")
    with pytest.raises(SourceError, match="libkvm.argument 4294967296 is out of range"):
        open_libkvm(WEB01, predicate="tty", argument=2**32)


@pytest.mark.parametrize(
    "config",
    [{"threads": True}, {"predicate": "all"}, {"predicate": "all", "threads": True}],
    ids=repr,
)
def test_thread_rows_fold_into_one_record_per_process(
    open_libkvm: Opener, config: dict[str, Any]
) -> None:
    per_process = open_libkvm(WEB01).procs()
    folded = open_libkvm(WEB01, **config).procs()
    # A live thread row's ki_runtime is its thread's: the process's is the sum of its rows.
    assert [p.cpu_seconds for p in folded] == pytest.approx([p.cpu_seconds for p in per_process])
    assert [p._replace(cpu_seconds=0.0) for p in folded] == [
        p._replace(cpu_seconds=0.0) for p in per_process
    ]
    assert sum(p.threads for p in per_process) == 283 + 4 + 8 + 52 + 3 + 4 + 24


def test_all_with_threads_sends_kern_proc_all(open_libkvm: Opener) -> None:
    # KERN_PROC_ALL | KERN_PROC_INC_THREAD has no sysctl node; KERN_PROC_ALL is thread rows.
    assert libkvm.op_and_argument(LibkvmConfig(predicate="all", threads=True)) == (0, 0)
    assert libkvm.op_and_argument(LibkvmConfig(predicate="uid", argument=5, threads=True)) == (
        0x15,
        5,
    )


def test_crash_dump_thread_rows_keep_the_process_runtime(open_libkvm: Opener) -> None:
    # kvm_proclist writes p_rux's runtime, the whole process's, into every thread row.
    dump = open_libkvm(None, core=str(WEB01), threads=True)
    live = open_libkvm(WEB01)
    assert [p.cpu_seconds for p in dump.procs()] == [p.cpu_seconds for p in live.procs()]


def test_arguments_are_cast_like_the_kernel_casts_them(
    open_libkvm: Opener, tmp_path: pathlib.Path
) -> None:
    high = [
        "proc pid=10 uid=2147483648",
        "proc pid=11 uid=4294967295 ruid=4294967294",
        "proc pid=12 tdev=0xffffffff80000001",
        "proc pid=13 tdev=0x80000001",
    ]
    scenario = write(tmp_path, SMALL + "\n".join(high) + "\n")

    def pids(predicate: str, argument: int) -> list[int]:
        return [
            p.pid for p in open_libkvm(scenario, predicate=predicate, argument=argument).procs()
        ]

    assert pids("uid", 2**31) == [10]
    assert pids("uid", 2**32 - 1) == pids("uid", -1) == [11]
    assert pids("ruid", 2**32 - 2) == [11]
    # (dev_t)name[0]: the int sign-extends, so 2**64 - 2**31 + 1 is -2147483647 ...
    assert pids("tty", 2**64 - 2**31 + 1) == pids("tty", -(2**31) + 1) == [12]
    # ... and 0x80000001 cannot be selected at all.
    with pytest.raises(SourceError, match="sign-extends"):
        open_libkvm(scenario, predicate="tty", argument=0x80000001)
    with pytest.raises(SourceError, match="a uid from 0 to 4294967295"):
        open_libkvm(scenario, predicate="uid", argument=2**32)


def test_the_record_type_must_have_ki_structsize_bytes(
    open_libkvm: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = open_libkvm(WEB01)
    monkeypatch.setitem(KINFO_PROC_TYPES[8], 1088, "struct kinfo_proc_i386")
    with pytest.raises(SourceError, match="declared 768 bytes, the kernel's records 1088"):
        source.procs()


def test_the_native_layout_is_the_lp64_one_here() -> None:
    assert kvm_cdef.native_kinfo_proc_size() == 1088 == ffi.sizeof("struct kinfo_proc_lp64")


def test_records_are_copied_out_before_the_next_call(open_libkvm: Opener) -> None:
    # The fake poisons and frees the previous array on every call; records kept from the
    # first call must still hold the first call's values.
    source = open_libkvm(WEB01)
    first = source.procs()
    snapshot = [tuple(p) for p in first]
    for _ in range(3):
        assert source.procs() == first
    assert [tuple(p) for p in first] == snapshot
    assert first[1].comm == "init" and first[1].state == "idle"


@pytest.mark.parametrize("read", ["procs", "census"])
def test_getprocs_failure_carries_the_library_text_and_the_next_call_recovers(
    open_libkvm: Opener, tmp_path: pathlib.Path, read: str
) -> None:
    scenario = write(tmp_path, SMALL + "fail getprocs 2 kvm_getprocs: Cannot allocate memory\n")
    source = open_libkvm(scenario)
    call = getattr(source, read)
    good = call()
    with pytest.raises(SourceError) as caught:
        call()
    assert str(caught.value) == "kvm_getprocs failed: kvm_getprocs: Cannot allocate memory"
    assert call() == good
    procs = source.procs()
    assert [p.pid for p in procs] == [1, 2]
    assert good == (procs if read == "procs" else census_of(procs))


def test_open_failure_carries_errbuf(open_libkvm: Opener, tmp_path: pathlib.Path) -> None:
    scenario = write(tmp_path, SMALL + "fail open * /dev/mem: Permission denied\n")
    with pytest.raises(SourceError) as caught:
        open_libkvm(scenario)
    assert str(caught.value) == (
        "kvm_openfiles cannot open the running kernel: /dev/mem: Permission denied"
    )


def test_open_failure_when_the_scenario_is_missing(
    open_libkvm: Opener, tmp_path: pathlib.Path
) -> None:
    with pytest.raises(SourceError, match="FAKE_KVM_SCENARIO is not set"):
        open_libkvm()
    missing = tmp_path / "missing.scenario"
    with pytest.raises(SourceError, match=f"{missing}: No such file or directory"):
        open_libkvm(missing)


def test_swapinfo_failure_carries_the_text_and_other_calls_keep_working(
    open_libkvm: Opener, tmp_path: pathlib.Path
) -> None:
    text = "cannot read sysctl vm.swap_info:Operation not permitted"
    source = open_libkvm(write(tmp_path, SMALL + f"fail swapinfo * {text}\n"))
    with pytest.raises(SourceError) as caught:
        source.swap()
    assert str(caught.value) == f"kvm_getswapinfo failed: {text}"
    assert [p.pid for p in source.procs()] == [1, 2]


def test_loadavg_failure_reports_errno_not_a_stale_error_text(
    open_libkvm: Opener, tmp_path: pathlib.Path
) -> None:
    failing = "fail getprocs 1 kvm_getprocs: stale text\nfail loadavg * unused\n"
    source = open_libkvm(write(tmp_path, SMALL + failing))
    with pytest.raises(SourceError, match="stale text"):
        source.procs()
    with pytest.raises(SourceError) as caught:
        source.loadavg()
    assert str(caught.value) == "kvm_getloadavg (got -1 of 3 samples) failed: Invalid argument"


def test_an_unknown_structsize_is_refused(open_libkvm: Opener, tmp_path: pathlib.Path) -> None:
    source = open_libkvm(write(tmp_path, SMALL + "structsize 999\n"))
    with pytest.raises(SourceError) as caught:
        source.procs()
    assert "is 999 bytes" in str(caught.value)
    assert "knows 1088" in str(caught.value)


def test_a_missing_library_is_named_with_the_dlerror_text(tmp_path: pathlib.Path) -> None:
    library = str(tmp_path / "libkvm.so.7")
    with pytest.raises(SourceError) as caught:
        LibkvmSource(LibkvmConfig(library=library))
    assert str(caught.value) == (
        f"cannot load libkvm from '{library}': {library}: cannot open shared object file:"
        " No such file or directory"
    )


def test_a_missing_sysctl_is_named(open_libkvm: Opener, tmp_path: pathlib.Path) -> None:
    source = open_libkvm(write(tmp_path, SMALL.replace("sysctl kern.maxthread 20000\n", "")))
    with pytest.raises(SourceError, match="^sysctl kern.maxthread: No such file or directory$"):
        source.limits()


def test_terminals_without_a_name_are_no_tty(open_libkvm: Opener, tmp_path: pathlib.Path) -> None:
    scenario = SMALL + "tty 0x95 pts/0\nproc pid=3 tdev=0x95\nproc pid=4 tdev=0x1234\n"
    procs = open_libkvm(write(tmp_path, scenario)).procs()
    assert [p.tty for p in procs] == [NO_TTY, NO_TTY, "pts/0", NO_TTY]


def dump_view(proc: Proc, dump: bool) -> Proc:
    """What a crash dump can show of ``proc`` (a live record): kvm_proclist fills no
    ki_tdflags, ki_slptime or ki_start, reads no terminal device, and copies at most 18
    bytes of the command name."""
    if not dump:
        return proc
    sleeping = proc.state in ("idle", "uninterruptible", "sleeping")
    return proc._replace(
        tty=NO_TTY if proc.tty == NO_TTY and proc.state != "zombie" else UNKNOWN_TTY,
        state="sleeping" if sleeping else proc.state,
        comm=proc.comm[:18],
        start_time=None,
    )


@pytest.mark.parametrize("scenario", [WEB01, DB01], ids=["web01", "db01"])
def test_crash_dump_shows_only_what_libkvm_fills(open_libkvm: Opener, scenario: Any) -> None:
    live = open_libkvm(scenario)
    expected = ([dump_view(p, True) for p in live.procs()], live.loadavg())
    live.close()
    dump = open_libkvm(None, kernel="/boot/kernel/kernel", core=str(scenario))
    assert (dump.procs(), dump.loadavg()) == expected
    assert {p.state for p in dump.procs()} <= {
        "sleeping",
        "running",
        "stopped",
        "zombie",
        "waiting",
        "lock",
    }
    assert dump.census() == census_of(dump.procs())
    # The poll zero-fills only the states a dump can tell apart.
    assert set(live.states) - set(dump.states) == {"idle", "uninterruptible"}


def test_crash_dump_limits_and_swap(open_libkvm: Opener, tmp_path: pathlib.Path) -> None:
    dump = open_libkvm(None, kernel="/boot/kernel/kernel", core=str(DB01))
    assert dump.limits() == HostLimits(cpus=16, max_procs=32724, max_threads=1000000)
    # libkvm's kvm_getswapinfo_kvm needs the symbol _dmmax, which current kernels lack.
    with pytest.raises(SourceError) as caught:
        dump.swap()
    assert str(caught.value) == "kvm_getswapinfo failed: unable to find dmmax"
    old_kernel = open_libkvm(None, core=str(write(tmp_path, SMALL + "symbol _dmmax 32\n")))
    assert old_kernel.swap()[1] == SwapDevice("/dev/ada1p3", 200 * 4096, 20 * 4096)


@pytest.mark.parametrize(
    "config", [{"predicate": "uid", "argument": 4242}, {"predicate": "pid", "argument": 99999}]
)
def test_crash_dump_selection_of_nothing_is_no_processes(
    open_libkvm: Opener, config: dict[str, Any]
) -> None:
    # libkvm frees a dead kernel's empty array and returns NULL without an error text.
    dump = open_libkvm(None, core=str(WEB01), **config)
    assert dump.procs() == [] and dump.census() == {}


def test_crash_dump_refuses_a_tty_predicate(open_libkvm: Opener) -> None:
    with pytest.raises(SourceError, match="'tty' cannot select from a crash dump"):
        open_libkvm(None, core=str(WEB01), predicate="tty", argument=0x95)


def test_crash_dump_limits_come_from_kernel_symbols(
    open_libkvm: Opener, tmp_path: pathlib.Path
) -> None:
    # A live scenario with other sysctls is open too: the dump must not answer from it.
    open_libkvm(WEB01)
    core = write(tmp_path, SMALL.replace("sysctl kern.maxthread 20000\n", ""), "vmcore.0")
    dump = open_libkvm(None, core=str(core))
    with pytest.raises(SourceError) as caught:
        dump.limits()
    assert str(caught.value) == "kvm_nlist2: the kernel has no symbol _maxthread"


def test_kvm_read2_on_a_live_handle_is_a_short_read(kd: tuple[Any, Any]) -> None:
    lib, handle = kd
    entries = ffi.new("struct kvm_nlist[2]")
    name = ffi.new("char[]", b"_maxproc")
    entries[0].n_name = name
    assert lib.kvm_nlist2(handle, entries) == 0
    assert entries[0].n_value != 0
    assert lib.kvm_read2(handle, entries[0].n_value, ffi.new("int *"), 4) == 0
    assert ffi.string(lib.kvm_geterr(handle)) == b"short read"


def test_close_is_once_and_later_calls_fail(open_libkvm: Opener) -> None:
    source = open_libkvm(WEB01)
    source.close()
    source.close()  # a second kvm_close would be a double free
    with pytest.raises(SourceError, match="closed"):
        source.procs()


def test_concurrent_polls_are_serialised(open_libkvm: Opener) -> None:
    source = open_libkvm(WEB01)
    expected = (source.procs(), source.swap())
    results: list[bool] = []

    def poll() -> None:
        results.extend((source.procs(), source.swap()) == expected for _ in range(50))

    threads = [threading.Thread(target=poll) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * 400


# The fake's own semantics, through a bare cffi handle: what the source relies on.


@pytest.fixture
def live_handle(
    fake_libkvm: pathlib.Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: pathlib.Path,
) -> Iterator[Callable[[str], tuple[Any, Any]]]:
    """Opens live handles of the fake on a scenario text; all are closed at teardown."""
    lib = ffi.dlopen(str(fake_libkvm))
    handles: list[Any] = []

    def open_(text: str) -> tuple[Any, Any]:
        monkeypatch.setenv("FAKE_KVM_SCENARIO", str(write(tmp_path, text, f"{len(handles)}.s")))
        handle = lib.kvm_openfiles(ffi.NULL, b"/dev/null", ffi.NULL, 0, ffi.new("char[2048]"))
        assert handle != ffi.NULL
        handles.append(handle)
        return lib, handle

    yield open_
    for handle in handles:
        lib.kvm_close(handle)


@pytest.fixture
def kd(live_handle: Callable[[str], tuple[Any, Any]]) -> tuple[Any, Any]:
    """A live handle whose second kvm_getprocs fails."""
    return live_handle(SMALL + "fail getprocs 2 kvm_getprocs: injected\n")


@pytest.fixture
def live(live_handle: Callable[[str], tuple[Any, Any]]) -> tuple[Any, Any]:
    """A live handle on the scenario SMALL."""
    return live_handle(SMALL)


def test_fake_getprocs_failure_leaves_cnt_alone(kd: tuple[Any, Any]) -> None:
    lib, handle = kd
    count = ffi.new("int *", -1)
    assert lib.kvm_getprocs(handle, 8, 0, count) != ffi.NULL
    assert count[0] == 2
    count[0] = -1
    assert lib.kvm_getprocs(handle, 8, 0, count) == ffi.NULL
    assert count[0] == -1
    assert ffi.string(lib.kvm_geterr(handle)) == b"kvm_getprocs: injected"


def test_fake_swapinfo_puts_the_grand_total_at_the_returned_index(kd: tuple[Any, Any]) -> None:
    lib, handle = kd
    entries = ffi.new("struct kvm_swap[3]")
    assert lib.kvm_getswapinfo(handle, entries, 3, 0) == 2
    total = entries[2]
    assert (total.ksw_used, total.ksw_total, total.ksw_devname[0]) == (30, 300, b"\0")
    one = ffi.new("struct kvm_swap[2]")
    assert lib.kvm_getswapinfo(handle, one, 2, 0) == 1
    assert ffi.string(one[0].ksw_devname) == b"ada0p3"
    assert (one[1].ksw_used, one[1].ksw_total) == (30, 300)
    assert lib.kvm_getswapinfo(handle, one, 0, 0) == -1


def records_of(lib: Any, handle: Any, op: int, arg: int = 0) -> list[Any]:
    count = ffi.new("int *", -1)
    base = lib.kvm_getprocs(handle, op, arg, count)
    assert base != ffi.NULL, ffi.string(lib.kvm_geterr(handle))
    return list(ffi.cast("struct kinfo_proc_lp64 *", base)[0 : count[0]])


@pytest.fixture
def core(fake_libkvm: pathlib.Path, tmp_path: pathlib.Path) -> Iterator[tuple[Any, Any]]:  # noqa: F811
    """A crash-dump handle of the fake on the scenario SMALL plus a terminal and a zombie."""
    text = SMALL + "tty 0x95 pts/0\nproc pid=3 uid=7 stat=SSLEEP tdflags=0x8 slptime=3 tdev=0x95"
    text += " runtime=5000000 start=1700000000.5 comm=a_command_name_of_19\nproc pid=4 stat=SZOMB"
    lib = ffi.dlopen(str(fake_libkvm))
    path = write(tmp_path, text + " tdev=0x95\n", "vmcore.0")
    handle = lib.kvm_openfiles(
        b"/boot/kernel/kernel", str(path).encode(), ffi.NULL, 0, ffi.new("char[2048]")
    )
    assert handle != ffi.NULL
    yield lib, handle
    lib.kvm_close(handle)


def test_fake_core_records_carry_only_what_kvm_proclist_fills(core: tuple[Any, Any]) -> None:
    lib, handle = core
    rows = {kp.ki_pid: kp for kp in records_of(lib, handle, 8)}
    sleeper, zombie = rows[3], rows[4]
    # Filled: ids, credentials, ki_stat from the thread, sizes, p_rux's runtime, p_flag.
    assert (sleeper.ki_uid, sleeper.ki_stat, sleeper.ki_runtime) == (7, 3, 5000000)
    assert sleeper.ki_flag & 0x2  # P_CONTROLT
    # Left as kvm_proclist leaves them: memset to 0 (ki_structsize included), NODEV tty.
    for kp in rows.values():
        assert kp.ki_structsize == 0
        assert kp.ki_tdev == 2**64 - 1 and kp.ki_tdev_freebsd11 == 2**32 - 1
        assert (kp.ki_tdflags, kp.ki_slptime, kp.ki_start.tv_sec, kp.ki_start.tv_usec) == (0,) * 4
        assert (kp.ki_rusage.ru_utime.tv_sec, kp.ki_rusage.ru_stime.tv_usec) == (0, 0)
    assert zombie.ki_flag == 0  # p_flag is copied only for a process that is not a zombie
    assert ffi.string(sleeper.ki_comm) == b"a_command_name_of_"  # strlcpy(.., MAXCOMLEN)
    # Thread rows: each carries the process's runtime, not its thread's.
    worker = [kp for kp in records_of(lib, handle, 0) if kp.ki_pid == 2]
    assert len(worker) == 3 and {kp.ki_runtime for kp in worker} == {1000001}


def test_fake_core_selects_no_terminal_and_answers_empty_without_error(
    core: tuple[Any, Any],
) -> None:
    lib, handle = core
    count = ffi.new("int *", -1)
    # KERN_PROC_TTY compares the record's ki_tdev, NODEV in a dump: 0x95 selects nothing.
    assert lib.kvm_getprocs(handle, 4, 0x95, count) == ffi.NULL
    assert count[0] == 0 and ffi.string(lib.kvm_geterr(handle)) == b""
    # ... and (dev_t)-1 selects every process with P_CONTROLT.
    assert [kp.ki_pid for kp in records_of(lib, handle, 4, -1)] == [3, 4]


def test_fake_live_refuses_every_op_without_a_sysctl_node(live: tuple[Any, Any]) -> None:
    """sysctl_kern_proc's nodes (sys/kern/kern_proc.c): all, pid, pgrp, sid, tty, uid, ruid,
    proc, gid, rgid, and _td variants of each but all. KERN_PROC_ALL | INC_THREAD is none."""
    lib, handle = live
    with_node = {0, 1, 2, 3, 4, 5, 6, 8, 10, 11}
    with_node |= {op | 0x10 for op in with_node - {0}}
    count = ffi.new("int *", -1)
    for op in range(64):
        base = lib.kvm_getprocs(handle, op, 1, count)
        if op in with_node - {10, 11, 26, 27}:  # gid and rgid are not emulated
            assert base != ffi.NULL, op
        else:
            assert base == ffi.NULL, op
            text = ffi.string(lib.kvm_geterr(handle)).decode()
            expected = "not emulated" if op in with_node else "No such file or directory"
            assert expected in text, (op, text)


def test_fake_live_thread_rows_split_the_runtime(live: tuple[Any, Any]) -> None:
    lib, handle = live
    rows = records_of(lib, handle, 8 | 0x10)
    assert [kp.ki_pid for kp in rows] == [1, 2, 2, 2]
    # ki_runtime of a thread row is the thread's (fill_kinfo_thread with preferthread).
    assert sum(kp.ki_runtime for kp in rows[1:]) == records_of(lib, handle, 8)[1].ki_runtime


# census(): the kinfo_proc array read without a record per process must say what
# census_of(procs()) says, in every mode.

PREDICATES = [
    {},
    {"predicate": "pid", "argument": 1201},
    {"predicate": "pgrp", "argument": 1230},
    {"predicate": "session", "argument": 1201},
    {"predicate": "tty", "argument": 0x95},
    {"predicate": "uid", "argument": 1001},
    {"predicate": "ruid", "argument": 1001},
    {"predicate": "pid", "argument": 99999},  # gone: no processes, not an error
    {"threads": True},  # thread rows: one process per pid with its visible threads
    {"predicate": "all"},
    {"predicate": "uid", "argument": 1001, "threads": True},
]


@pytest.mark.parametrize("scenario", [WEB01, DB01], ids=["web01", "db01"])
@pytest.mark.parametrize("config", PREDICATES, ids=repr)
def test_census_is_the_census_of_the_records(
    open_libkvm: Opener, scenario: pathlib.Path, config: dict[str, Any]
) -> None:
    source = open_libkvm(scenario, **config)
    census = source.census()
    assert census == census_of(source.procs())
    assert census == census_of(source.procs())  # and again: no state kept between calls
    if config.get("argument") == 99999:
        assert census == {}


def test_census_of_web01(open_libkvm: Opener) -> None:
    census = open_libkvm(WEB01).census()
    assert sum(census.values()) == 30
    assert census[(1001, "pts/0", "stopped", 1, 0)] == 1
    assert (
        census[(0, NO_TTY, "idle", 1, 0)]
        == Counter((p.uid, p.tty, p.state, p.threads, p.jid) for p in open_libkvm(WEB01).procs())[
            (0, NO_TTY, "idle", 1, 0)
        ]
    )


def test_census_is_copied_out_before_the_next_call(open_libkvm: Opener) -> None:
    # The fake poisons and frees the previous array on every call.
    source = open_libkvm(WEB01)
    first = source.census()
    snapshot = dict(first)
    for _ in range(3):
        assert source.procs() and source.census() == first
    assert first == snapshot


def test_census_refuses_an_unknown_structsize(open_libkvm: Opener, tmp_path: pathlib.Path) -> None:
    source = open_libkvm(write(tmp_path, SMALL + "structsize 999\n"))
    with pytest.raises(SourceError, match="is 999 bytes"):
        source.census()


def test_census_of_no_processes_and_of_a_closed_source(
    open_libkvm: Opener, tmp_path: pathlib.Path
) -> None:
    lines = SMALL.splitlines(keepends=True)
    source = open_libkvm(write(tmp_path, "".join(x for x in lines if not x.startswith("proc"))))
    assert source.census() == {}
    source.close()
    with pytest.raises(SourceError, match="closed"):
        source.census()


def test_census_names_terminals_like_procs(open_libkvm: Opener, tmp_path: pathlib.Path) -> None:
    # 0x1234 and NODEV both have no name: two rows, one kind, their counts add up.
    scenario = SMALL + "tty 0x95 pts/0\nproc pid=3 tdev=0x95\nproc pid=4 tdev=0x1234\n"
    source = open_libkvm(write(tmp_path, scenario))
    census = source.census()
    assert census == census_of(source.procs())
    assert census[(0, NO_TTY, "unknown", 1, 0)] == 1
    assert census[(0, "pts/0", "unknown", 1, 0)] == 1


def random_scenario(rng: random.Random, n: int) -> str:
    """Processes of many uids, terminals, states, flags and sleep times."""
    ttys = {0x90 + i: f"pts/{i}" for i in range(6)} | {0x20: "ttyv0"}
    devices = ["none", *map(hex, ttys), "0x1234", str(2**64 - 2)]
    uids = [0, 1, 33, 65534, 770, 1001, 2**31, 2**32 - 1, *range(2000, 2030)]
    lines = SMALL.split("\nproc ")[0].splitlines()
    lines += [f"tty {dev:#x} {name}" for dev, name in ttys.items()]
    for pid in range(1, n + 1):
        stat = rng.choice(["SSLEEP"] * 6 + ["SRUN", "SSTOP", "SZOMB", "SWAIT", "SLOCK", "SIDL"])
        if rng.random() < 0.05:
            stat = str(rng.choice([0, 8, 9, 127, 128, 255]))  # values ps does not know
        tdflags = rng.choice([0, 8, 0x808, 0x10008, 0x4, -8, -9, 2**62 + 8, rng.getrandbits(63)])
        slptime = rng.choice([0, 1, MAXSLP - 1, MAXSLP, MAXSLP + 1, 256, 2**32 - 1])
        if rng.random() < 0.5:
            slptime = rng.randrange(2**32)
        threads = rng.choice([1, 1, 1, 2, 4, 100, 0, -1, 2**31 - 1, -(2**31)])
        lines.append(
            f"proc pid={pid} uid={rng.choice(uids)} tdev={rng.choice(devices)} stat={stat}"
            f" tdflags={tdflags} slptime={slptime} threads={threads}"
        )
    return "\n".join(lines) + "\n"


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(seed=st.integers(0, 2**32), n=st.integers(1, 3000))
def test_census_of_a_random_host(
    fake_libkvm: pathlib.Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: pathlib.Path,
    seed: int,
    n: int,
) -> None:
    text = random_scenario(random.Random(seed), n)
    path = write(tmp_path, text)
    monkeypatch.setenv("FAKE_KVM_SCENARIO", str(path))
    source = LibkvmSource(LibkvmConfig(library=str(fake_libkvm)))
    try:
        census = source.census()
        assert census == census_of(source.procs())
        assert sum(census.values()) == n - text.count("stat=SIDL ")  # PRS_NEW: not listed
    finally:
        source.close()


RECORD_TYPES = sorted({t for types in KINFO_PROC_TYPES.values() for t in types.values()})


def test_state_tables_agree_with_freebsd_state() -> None:
    for stat in range(256):
        for tdflags in (0, 8, 0x7F7, -1, 2**40):
            for slptime in (0, MAXSLP - 1, MAXSLP, 2**32 - 1):
                code = libkvm._STAT_CODE[stat] | libkvm._SINTR[tdflags & 0xFF] | (slptime >= MAXSLP)
                word = libkvm._STATE_WORDS[libkvm._WORD_OF[code]]
                assert word == freebsd_state(stat, tdflags, slptime)


def test_close_gives_up_on_a_call_that_hangs(
    open_libkvm: Opener, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """kvm_getprocs stalls for 3 s holding the source's lock: close() returns after about
    CLOSE_WAIT with a warning instead of hanging a shutdown behind it; the call finishes."""
    source = open_libkvm(write(tmp_path, SMALL + "delay getprocs 3\n"))
    census: list[Census] = []
    caller = threading.Thread(target=lambda: census.append(source.census()))
    caller.start()
    time.sleep(0.5)  # well inside the 3 s call
    started = time.monotonic()
    source.close()
    assert time.monotonic() - started < libkvm.CLOSE_WAIT + 1.0
    assert "libkvm busy" in caplog.text
    caller.join(timeout=10)
    assert sum(census[0].values()) == 2  # the hung call still answered
