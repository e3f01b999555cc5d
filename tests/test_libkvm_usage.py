"""Resources and jails on the FreeBSD path: the libkvm source over the fake libkvm."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
from fakelib import SCENARIOS, fake_libkvm, fixed_passwd  # noqa: F401 (fixture)
from test_libkvm_e2e import libkvm_config
from test_libkvm_source import Opener, open_libkvm, write  # noqa: F401 (fixture)

from kvm_exporter.aggregate import user_names
from kvm_exporter.groups.rules import parse_process_names
from kvm_exporter.poller import Poller, Settings
from kvm_exporter.records import (
    USAGE_COUNTERS,
    USAGE_JID,
    USAGE_PID,
    USAGE_START,
    USAGE_START_FRACTION,
    USAGE_STATE,
    USAGE_THREADS,
    SourceError,
)
from kvm_exporter.sources.kvm_cdef import ffi
from kvm_exporter.usage import Accounting

JAILS01 = SCENARIOS / "jails01.scenario"


def jailed(open_libkvm: Opener, fake: pathlib.Path, scenario: pathlib.Path, **config: Any) -> Any:  # noqa: F811
    return open_libkvm(scenario, jail_library=str(fake), **config)


def rows_of(source: Any) -> list[Any]:
    """The decoded usage rows of one survey."""
    return list(map(source.usage_spec.decode, source.survey().usage))


def test_usage_rows_carry_ki_rusage_and_the_jail(
    open_libkvm: Opener,  # noqa: F811
    fake_libkvm: pathlib.Path,  # noqa: F811
) -> None:
    source = jailed(open_libkvm, fake_libkvm, JAILS01)
    rows = {row[USAGE_PID]: row for row in rows_of(source)}
    # pid 1201: utime=4000000 stime=2500000 (us) minflt=120000 majflt=40 nvcsw=90000
    # nivcsw=3000 inblock=91000 oublock=72000, start=1793001710.5, uid 770, jail 7, ppid 1200,
    # one thread, SSLEEP with TDF_SINTR (sleeping), comm postgres (ki_comm: 20 bytes).
    spec = source.usage_spec
    assert spec.state(rows[1201][USAGE_STATE]) == "sleeping"
    assert spec.start_time(*rows[1201][USAGE_START : USAGE_START_FRACTION + 1]) == 1793001710.5
    assert rows[1201] == (
        1201,
        1793001710,
        500000,
        770,
        7,
        12000,
        412000256,
        1200,
        1,
        rows[1201][USAGE_STATE],
        b"postgres".ljust(20, b"\0"),
        *(4, 0, 2, 500000),
        *(120000, 40, 90000, 3000, 91000, 72000),
        *(0,) * 10,  # no reaped children
    )
    assert {row[USAGE_JID] for row in rows.values()} == {0, 3, 7}
    assert (source.jail_name(0), source.jail_name(3), source.jail_name(7)) == ("host", "www", "db")
    assert source.jail_name(9) == "9"  # jail_getname(3) fails: "jail 9 not found"


def test_threads_mode_usage_is_the_process_rows(
    open_libkvm: Opener,  # noqa: F811
    fake_libkvm: pathlib.Path,  # noqa: F811
) -> None:
    """With threads the census reads thread rows, the usage process rows: the same rows as
    without threads (pid 1102 has two threads)."""
    procs = rows_of(jailed(open_libkvm, fake_libkvm, JAILS01))
    threads = rows_of(jailed(open_libkvm, fake_libkvm, JAILS01, threads=True))
    assert threads == procs and any(row[USAGE_THREADS] == 2 for row in procs)


def test_per_jail_resources_and_jail_names(
    open_libkvm: Opener,  # noqa: F811
    fake_libkvm: pathlib.Path,  # noqa: F811
) -> None:
    source = jailed(open_libkvm, fake_libkvm, JAILS01)
    assert source.usage_spec is not None
    accounting = Accounting(source, ("jail",), 1000, source.usage_spec)
    res = accounting.poll(source.survey(), user_names())
    assert res.processes == {("host",): 2, ("www",): 3, ("db",): 2}
    assert res.resident_bytes[("db",)] == (52000 + 12000) * 4096
    assert res.jails == {0: "host", 3: "www", 7: "db"}
    assert res.counters["cpu", "user"] == {("host",): 0.0, ("www",): 0.0, ("db",): 0.0}


def test_from_inside_a_jail_the_reader_sees_its_own_jail_as_jid_0(
    open_libkvm: Opener,  # noqa: F811
    fake_libkvm: pathlib.Path,  # noqa: F811
    tmp_path: pathlib.Path,
) -> None:
    scenario = write(tmp_path, JAILS01.read_text() + "reader_jail 7\n")
    source = jailed(open_libkvm, fake_libkvm, scenario)
    rows = rows_of(source)
    assert sorted(row[USAGE_PID] for row in rows) == [1200, 1201]
    assert {row[USAGE_JID] for row in rows} == {0}


def test_a_crash_dump_has_absolute_jids_memory_and_no_counters(
    open_libkvm: Opener,  # noqa: F811
    fake_libkvm: pathlib.Path,  # noqa: F811
) -> None:
    dump = jailed(open_libkvm, fake_libkvm, None, kernel="/boot/kernel/kernel", core=str(JAILS01))
    rows = rows_of(dump)
    assert {row[USAGE_JID] for row in rows} == {0, 3, 7}
    assert all(len(row) == USAGE_COUNTERS for row in rows)
    assert dump.usage_spec is not None and dump.usage_spec.counters == ()
    assert dump.jail_name(3) == "3"  # the running host's jails are not the dump's
    assert dump.limits().memory_bytes is None


def test_the_fake_is_as_strict_as_freebsd(fake_libkvm: pathlib.Path, monkeypatch: Any) -> None:  # noqa: F811
    """hw.physmem is an unsigned long: an int's room is ENOMEM, as SYSCTL_OUT gives; an unknown
    jid is NULL with jail_getname's error text."""
    monkeypatch.setenv("FAKE_KVM_SCENARIO", str(JAILS01))
    lib = ffi.dlopen(str(fake_libkvm))
    small, size = ffi.new("int *"), ffi.new("size_t *", ffi.sizeof("int"))
    assert lib.sysctlbyname(b"hw.physmem", small, size, ffi.NULL, 0) == -1
    value, size = ffi.new("unsigned long *"), ffi.new("size_t *", ffi.sizeof("unsigned long"))
    assert lib.sysctlbyname(b"hw.physmem", value, size, ffi.NULL, 0) == 0
    assert value[0] == 17179869184
    assert lib.jail_getname(5) == ffi.NULL


def test_exporter_serves_per_jail_resources(
    exporter: Any,
    fake_libkvm: pathlib.Path,  # noqa: F811
) -> None:
    config = libkvm_config(fake_libkvm) + (
        f"  jail_library: {fake_libkvm}\nresources:\n  labels: [user, jail]\n"
        "labels: [user, state]\n"
    )
    e = exporter(config, env={"FAKE_KVM_SCENARIO": str(JAILS01), **fixed_passwd()})
    got = e.metrics()
    rss = {
        tuple(sorted(dict(labels).items())): value
        for (name, labels), value in got.items()
        if name == "kvm_resident_memory_bytes"
    }
    assert rss[(("jail", "db"), ("user", "770"))] == (52000 + 12000) * 4096
    assert rss[(("jail", "www"), ("user", "www-data"))] == (3100 + 3000) * 4096
    info = {dict(lb)["jid"]: dict(lb)["jail"] for (n, lb) in got if n == "kvm_jail_info"}
    assert info == {"0": "host", "3": "www", "7": "db"}
    assert got["kvm_memory_total_bytes", frozenset()] == 17179869184
    modes = {dict(lb)["mode"] for (n, lb) in got if n == "kvm_cpu_seconds_total"}
    assert modes == {"user", "system"}
    for family in ("kvm_context_switches_total", "kvm_block_operations_total"):
        assert any(n == family for (n, _) in got)


def test_process_counts_by_jail(
    exporter: Any,
    fake_libkvm: pathlib.Path,  # noqa: F811
) -> None:
    """`jail` is a label of the counts too: jails01 has 2 host, 3 www and 2 db processes."""
    config = libkvm_config(fake_libkvm) + f"  jail_library: {fake_libkvm}\nlabels: [jail, state]\n"
    got = exporter(config, env={"FAKE_KVM_SCENARIO": str(JAILS01), **fixed_passwd()}).metrics()
    per_jail: dict[str, float] = {}
    for (name, labels), value in got.items():
        if name == "kvm_processes":
            jail = dict(labels)["jail"]
            per_jail[jail] = per_jail.get(jail, 0) + value
    assert per_jail == {"host": 2, "www": 3, "db": 2, "other": 0}  # other: zero-filled states


@pytest.mark.parametrize("threads", [False, True])
def test_a_poll_with_groups_and_resources_makes_one_kvm_getprocs(
    open_libkvm: Opener,  # noqa: F811
    fake_libkvm: pathlib.Path,  # noqa: F811
    tmp_path: pathlib.Path,
    threads: bool,
) -> None:
    """One read, or with threads two: the thread rows for the census, the process rows for
    the usage (an exited thread's usage is in no thread row)."""
    # The fake fails the handle's next kvm_getprocs: a poll reading more loses a part.
    second = f"fail getprocs {2 + threads} kvm_getprocs: a second walk\n"
    scenario = write(tmp_path, JAILS01.read_text() + second)
    source = jailed(open_libkvm, fake_libkvm, scenario, threads=threads)
    rules = parse_process_names([{"name": "{{.Comm}}", "comm": ["nginx"]}])
    snap = Poller(source, Settings(groups=rules)).poll()
    assert snap.success["procs"] and snap.success["groups"]
    assert snap.groups is not None and snap.groups.processes == {"nginx": 3}
    assert snap.groups.counters and snap.resources is not None
    with pytest.raises(SourceError, match="a second walk"):
        source.survey()
