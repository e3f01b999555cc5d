"""The gather of kinfo_proc records into usage records and census rows: the compiled one
(``_procscan``'s ``kvm_gather``) and the Python fallback give the same bytes."""

from __future__ import annotations

import pathlib
import random
import re
from collections import Counter
from typing import Any

import pytest
from fakelib import SCENARIOS, fake_libkvm  # noqa: F401 (fixture)
from test_libkvm_source import RECORD_TYPES, Opener, open_libkvm, random_scenario, write  # noqa: F401

from kvm_exporter.records import Survey
from kvm_exporter.sources import libkvm
from kvm_exporter.sources.kvm_cdef import ffi
from kvm_exporter.states import MAXSLP, freebsd_state

JAILS01 = SCENARIOS / "jails01.scenario"
DUMP = {"kernel": "/boot/kernel/kernel"}
CONFIGS: dict[str, dict[str, Any]] = {
    "live": {},
    "live-threads": {"threads": True},
    "live-all": {"predicate": "all"},
    "dump": DUMP,
    "dump-threads": {**DUMP, "threads": True},
}


def rich_scenario(rng: random.Random, n: int) -> str:
    """:func:`random_scenario` plus what a usage record reads: times, counts, memory, jails,
    names of every length, ppids, and thread rows (pids repeated)."""
    lines = []
    for line in random_scenario(rng, n).splitlines():
        if line.startswith("proc "):
            # at most 4 threads: with thread rows, the fake lists each of them
            line = re.sub(r"threads=(\S+)", lambda m: f"threads={min(int(m[1]), 4)}", line)
            line += (
                f" ppid={rng.randrange(2**31)} jid={rng.choice((0, 3, 2**31 - 1))}"
                f" rss={rng.choice((0, -1, 2**62, rng.randrange(2**40)))}"
                f" size={rng.choice((0, 2**64 - 1, rng.randrange(2**48)))}"
                f" comm={'c' * rng.randrange(1, 25)} start={rng.randrange(2**33)}.25"
                f" utime={rng.randrange(2**50)} stime={rng.randrange(2**40)}"
                f" minflt={rng.choice((0, 2**48, rng.randrange(2**32)))}"
                f" majflt={rng.randrange(9)} nvcsw={rng.randrange(2**40)}"
                f" nivcsw={rng.randrange(99)} inblock={rng.randrange(9)}"
                f" oublock={rng.randrange(2**33)}"
            )
            if rng.random() < 0.1:  # a second thread row of the same process
                lines.append(line)
        lines.append(line)
    return "\n".join(lines) + "\n"


def surveys(open_: Opener, scenario: pathlib.Path, config: dict[str, Any]) -> tuple[Any, ...]:
    """What a source reads of ``scenario``: a survey, a census alone, and the procs."""
    if "kernel" in config:
        source = open_(None, core=str(scenario), **config)
    else:
        source = open_(scenario, **config)
    survey: Survey = source.survey()
    return survey.census, survey.usage, source.census(), source.procs()


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("name", ["web01", "db01", "jails01", "random"])
def test_the_compiled_and_the_python_gather_agree(
    open_libkvm: Opener,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: pathlib.Path,
    name: str,
    config: dict[str, Any],
) -> None:
    if name == "random":
        scenario = write(tmp_path, rich_scenario(random.Random(14), 1000))
    else:
        scenario = SCENARIOS / f"{name}.scenario"
    assert libkvm._gather_lib is not None  # CI compiles _procscan: never a silent fallback
    compiled = surveys(open_libkvm, scenario, config)
    monkeypatch.setattr(libkvm, "_gather_lib", None)
    python = surveys(open_libkvm, scenario, config)
    assert compiled[1] and compiled[0]
    assert compiled == python


@pytest.fixture(params=["compiled", "python"])
def gather_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with the compiled gather, then with the Python one."""
    assert libkvm._gather_lib is not None
    if request.param == "python":
        monkeypatch.setattr(libkvm, "_gather_lib", None)
    return str(request.param)


def random_records(record_type: str, n: int) -> Any:
    """``n`` records of ``record_type`` with the extremes of every field a row reads."""
    rng = random.Random(record_type)
    records = ffi.new(f"{record_type}[]", n)
    bits = {name: ffi.sizeof(t.type) * 8 for name, t in ffi.typeof(record_type).fields}
    timeval = dict(ffi.typeof(record_type).fields)["ki_start"].type.fields
    sec_bits, usec_bits = (ffi.sizeof(t.type) * 8 for _, t in timeval)  # time_t, long

    def signed(width: int) -> int:
        return rng.choice([0, -1, 2 ** (width - 1) - 1, -(2 ** (width - 1)), rng.randrange(99)])

    for kp in records:
        kp.ki_structsize = ffi.sizeof(record_type)
        kp.ki_pid, kp.ki_ppid, kp.ki_jid = signed(32), signed(32), signed(32)
        kp.ki_uid = rng.choice([0, 1001, 2**32 - 1, rng.randrange(2**32)])
        kp.ki_tdev = rng.choice([2**64 - 1, 0x95, rng.randrange(2**64)])
        kp.ki_stat = rng.choice([3, 3, 3, 1, 2, 4, 5, 6, 7, 0, 8, 255])
        kp.ki_tdflags = rng.choice([0, 8, -8, signed(bits["ki_tdflags"])])
        kp.ki_slptime = rng.choice([0, MAXSLP - 1, MAXSLP, 255, 256, rng.randrange(2**32)])
        kp.ki_numthreads = signed(32)
        kp.ki_rssize = signed(bits["ki_rssize"])
        kp.ki_size = rng.choice([0, 2 ** bits["ki_size"] - 1, 2 ** (bits["ki_size"] - 1)])
        ru, ch = kp.ki_rusage, kp.ki_rusage_ch
        for tv in (kp.ki_start, ru.ru_utime, ru.ru_stime, ch.ru_utime, ch.ru_stime):
            tv.tv_sec, tv.tv_usec = signed(sec_bits), signed(usec_bits)
        for counter in ("minflt", "majflt", "nvcsw", "nivcsw", "inblock", "oublock"):
            for usage in (ru, ch):
                setattr(usage, f"ru_{counter}", signed(bits["ki_rssize"]))  # longs
        kp.ki_comm = b"x" * rng.randrange(20)
    return records


@pytest.mark.parametrize("record_type", RECORD_TYPES)
def test_usage_records_of_every_layout(record_type: str, gather_path: str) -> None:
    """The usage records of any kinfo_proc layout hold what cffi reads: 32-bit longs widened
    with their sign, unsigned ones without, ki_comm as it is, the state as freebsd_state says."""
    n = 300
    records = random_records(record_type, n)
    expected = []
    for kp in records:
        state = freebsd_state(kp.ki_stat, kp.ki_tdflags, kp.ki_slptime)
        expected.append(
            (
                *(kp.ki_pid, kp.ki_start.tv_sec, kp.ki_start.tv_usec, kp.ki_uid, kp.ki_jid),
                *(kp.ki_rssize, kp.ki_size, kp.ki_ppid, kp.ki_numthreads, state),
                bytes(ffi.buffer(kp.ki_comm)),
                *(
                    value
                    for ru in (kp.ki_rusage, kp.ki_rusage_ch)  # own, then reaped children's
                    for value in (
                        *(ru.ru_utime.tv_sec, ru.ru_utime.tv_usec, ru.ru_stime.tv_sec),
                        *(ru.ru_stime.tv_usec, ru.ru_minflt, ru.ru_majflt, ru.ru_nvcsw),
                        *(ru.ru_nivcsw, ru.ru_inblock, ru.ru_oublock),
                    )
                ),
            )
        )
    gather = libkvm._gather_of(record_type, usage=True, census=False, dump=False)
    rows = libkvm._gather(memoryview(ffi.buffer(records)), n, gather)
    got = [
        (*row[:9], libkvm._STATE_WORDS[row[9]], *row[10:])
        for row in libkvm._USAGE_ROW.iter_unpack(rows)
    ]
    assert got == expected
    assert {row[5] for row in expected} >= {-1, 0}  # negative longs widened with their sign
    # A crash dump's state is ki_stat as it is.
    dump = libkvm._gather_of(record_type, usage=True, census=False, dump=True)
    states = [
        row[9]
        for row in libkvm._USAGE_ROW.iter_unpack(
            libkvm._gather(memoryview(ffi.buffer(records)), n, dump)
        )
    ]
    assert states == [kp.ki_stat for kp in records]


@pytest.mark.parametrize("record_type", RECORD_TYPES)
def test_starts_are_gathered_since_boot(record_type: str, gather_path: str) -> None:
    """ki_start less kern.boottime, the microseconds kept in [0, 1000000) by borrowing a
    second: a clock step moves both alike (fill_kinfo_proc_only adds getboottime() to
    p_start), so the rows do not change."""
    records = ffi.new(f"{record_type}[]", 4)
    starts = [(1000, 700000), (1001, 0), (1000, 699999), (5000, 999999)]
    for kp, (sec, usec) in zip(records, starts, strict=True):
        kp.ki_start.tv_sec, kp.ki_start.tv_usec = sec, usec
    gather = libkvm._gather_of(record_type, usage=True, census=False, dump=False)

    def since(boot: tuple[int, int]) -> list[tuple[int, int]]:
        rows = libkvm._gather(memoryview(ffi.buffer(records)), 4, gather, boot)
        return [row[1:3] for row in libkvm._USAGE_ROW.iter_unpack(rows)]

    expected = [(0, 0), (0, 300000), (-1, 999999), (4000, 299999)]
    assert since((1000, 700000)) == expected
    for kp in records:  # a step of +3600.5 s: every start and the boot time move
        kp.ki_start.tv_sec += 3600 + (kp.ki_start.tv_usec >= 500000)
        kp.ki_start.tv_usec = (kp.ki_start.tv_usec + 500000) % 1000000
    assert since((4601, 200000)) == expected


@pytest.mark.parametrize("record_type", RECORD_TYPES)
def test_census_rows_of_every_layout(record_type: str, gather_path: str) -> None:
    """The census rows of any kinfo_proc layout hold what cffi reads; gathered beside the
    usage records, each is the same as gathered alone."""
    n = 300
    records = random_records(record_type, n)
    expected = [
        (
            kp.ki_tdev,
            kp.ki_uid,
            kp.ki_numthreads,
            freebsd_state(kp.ki_stat, kp.ki_tdflags, kp.ki_slptime),
            kp.ki_jid,
        )
        for kp in records
    ]
    array = memoryview(ffi.buffer(records))
    rows = libkvm._gather(array, n, libkvm._gather_of(record_type, False, True, False))
    got = [
        (tdev, uid, threads, libkvm._STATE_WORDS[state], jid)
        for tdev, uid, threads, state, jid in libkvm._ROW.iter_unpack(rows)
    ]
    assert got == expected
    assert {row[3] for row in expected} >= {"idle", "sleeping", "uninterruptible", "unknown"}
    usage = libkvm._gather(array, n, libkvm._gather_of(record_type, True, False, False))
    both = libkvm._gather(array, n, libkvm._gather_of(record_type, True, True, False))
    u, c = libkvm._USAGE_ROW.size, libkvm._ROW.size
    assert both == b"".join(
        usage[i * u : (i + 1) * u] + rows[i * c : (i + 1) * c] for i in range(n)
    )
    gather = libkvm._gather_of(record_type, True, True, False)
    assert libkvm._usage_records(both, gather) == [usage[i * u : (i + 1) * u] for i in range(n)]
    # The census rows counted: each distinct one once, in the order first seen.
    counted = Counter(bytes(rows[i * c : (i + 1) * c]) for i in range(n))
    assert 1 < len(counted) < n
    expected_counts = (b"".join(counted), list(counted.values()))
    assert libkvm._counted(both, n, gather) == expected_counts
    census_only = libkvm._gather_of(record_type, False, True, False)
    assert libkvm._counted(rows, n, census_only) == expected_counts


def test_no_records_gather_no_rows(gather_path: str) -> None:
    gather = libkvm._gather_of(RECORD_TYPES[0], True, True, False)
    assert libkvm._gather(memoryview(b""), 0, gather) == b""
