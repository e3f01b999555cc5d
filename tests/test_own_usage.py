"""The exporter's own process_* metrics, as node_exporter users expect them, on both paths:
FreeBSD's (the libkvm source reads the exporter's kinfo_proc, here through the fake libkvm,
which answers KERN_PROC_PID of its caller from Linux's /proc/self) and Linux's (/proc)."""

from __future__ import annotations

import os
import pathlib
import resource
from typing import Any

import pytest
from conftest import samples
from fakelib import SCENARIOS, fake_libkvm  # noqa: F401 (fixture)
from test_exposition import run

from kvm_exporter.config import LibkvmConfig
from kvm_exporter.sources.kvm_cdef import ffi
from kvm_exporter.sources.libkvm import LibkvmSource

WEB01 = SCENARIOS / "web01.scenario"
NO_LABELS: frozenset[tuple[str, str]] = frozenset()


def linux_view(pid: int | str) -> dict[str, float]:
    """What Linux says of process ``pid``: start time, sizes, CPU seconds, open fds."""
    text = pathlib.Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    btime = next(
        int(line.split()[1])
        for line in pathlib.Path("/proc/stat").read_text().splitlines()
        if line.startswith("btime ")
    )
    tick = os.sysconf("SC_CLK_TCK")
    return {
        "start": btime + int(fields[19]) / tick,
        "vsize": int(fields[20]),
        "rss": int(fields[21]) * os.sysconf("SC_PAGESIZE"),
        "cpu": (int(fields[11]) + int(fields[12])) / tick,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


@pytest.mark.parametrize("dump", [False, True], ids=["live", "crash dump"])
def test_libkvm_own_usage_is_the_calling_process(
    fake_libkvm: pathlib.Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    dump: bool,
) -> None:
    """Read by sysctl (kern.proc.pid, kern.proc.nfds): this process even when the libkvm
    handle is a crash dump of another system."""
    monkeypatch.setenv("FAKE_KVM_SCENARIO", str(WEB01))
    core = {"core": str(SCENARIOS / "db01.scenario")} if dump else {}
    source = LibkvmSource(LibkvmConfig(library=str(fake_libkvm), **core))
    try:
        sum(range(3_000_000))  # some CPU time of our own
        before = resource.getrusage(resource.RUSAGE_SELF)
        fds = len(os.listdir("/proc/self/fd")) - 1  # listdir's own descriptor
        usage = source.own_usage()
        linux = linux_view("self")
    finally:
        source.close()
    assert usage is not None
    assert usage.open_fds == fds  # kern.proc.nfds
    assert usage.max_fds == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert usage.start_time == pytest.approx(linux["start"], abs=0.02)
    assert usage.virtual_bytes == pytest.approx(linux["vsize"], rel=0.05)
    assert usage.resident_bytes == pytest.approx(linux["rss"], rel=0.05)
    # ki_rusage user + system time, read after `before`
    assert before.ru_utime + before.ru_stime <= usage.cpu_seconds < linux["cpu"] + 0.5


def own_metrics(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> dict[str, float]:
    return {name: value for (name, labels), value in metrics.items() if name.startswith("process_")}


@pytest.mark.parametrize("source", ["libkvm", "procfs"])
def test_served_process_metrics_describe_the_exporter(
    exporter: Any,
    fake_libkvm: pathlib.Path,  # noqa: F811
    source: str,
) -> None:
    config = f"source: {source}\ninterval: 1h\nlibkvm:\n  library: {fake_libkvm}\n"
    e = exporter(config, env={"FAKE_KVM_SCENARIO": str(WEB01)})
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.prlimit(e.proc.pid, resource.RLIMIT_NOFILE, (777, hard))
    got = own_metrics(e.metrics())
    linux = linux_view(e.proc.pid)
    assert got["process_max_fds"] == 777  # read at scrape time
    assert got["process_start_time_seconds"] == pytest.approx(linux["start"], abs=0.02)
    # Sizes move as threads come and go (each may get its own malloc arena): bounds only;
    # test_libkvm_own_usage_is_the_calling_process pins them in-process.
    assert 0 < got["process_virtual_memory_bytes"] <= 2 * linux["vsize"]
    assert 0 < got["process_resident_memory_bytes"] <= 2 * linux["rss"]
    assert 0 < got["process_cpu_seconds_total"] <= linux["cpu"] + 0.1
    assert got["process_open_fds"] == pytest.approx(linux["fds"], abs=3)


def test_libkvm_path_does_not_fall_back_to_proc(
    exporter: Any,
    fake_libkvm: pathlib.Path,  # noqa: F811
    tmp_path: pathlib.Path,
) -> None:
    """With records of a layout the binding does not know, the libkvm source cannot read the
    exporter's own kinfo_proc, and no process_* metric is served (/proc would have answered)."""
    scenario = tmp_path / "failing.scenario"
    scenario.write_text(WEB01.read_text() + "structsize 999\n")
    config = f"source: libkvm\ninterval: 1h\nlibkvm:\n  library: {fake_libkvm}\n"
    e = exporter(config, env={"FAKE_KVM_SCENARIO": str(scenario)})
    got = e.metrics()
    assert own_metrics(got) == {}
    assert got[("kvm_up", NO_LABELS)] == 0
    assert "process metrics left out: kvm_getprocs: the kernel's struct kinfo_proc is 999" in (
        e.stderr()
    )


def test_fake_getprocs_of_the_caller_is_the_caller(
    fake_libkvm: pathlib.Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Like the kernel, the fake's live KERN_PROC_PID knows the calling process."""
    monkeypatch.setenv("FAKE_KVM_SCENARIO", str(WEB01))
    lib = ffi.dlopen(str(fake_libkvm))
    handle = lib.kvm_openfiles(ffi.NULL, b"/dev/null", ffi.NULL, 0, ffi.new("char[2048]"))
    try:
        count = ffi.new("int *")
        base = lib.kvm_getprocs(handle, 1, os.getpid(), count)
        assert base != ffi.NULL and count[0] == 1
        kp = ffi.cast("struct kinfo_proc_lp64 *", base)[0]
        assert (kp.ki_pid, kp.ki_uid, kp.ki_ruid) == (os.getpid(), os.geteuid(), os.getuid())
        assert kp.ki_start.tv_sec == pytest.approx(linux_view("self")["start"], abs=1)
    finally:
        lib.kvm_close(handle)


def test_once_prints_no_process_metrics() -> None:
    # A textfile for node_exporter must not repeat its own process_* metrics.
    result = run("--once")
    assert result.returncode == 0, result.stderr
    assert own_metrics(samples(result.stdout)) == {}
    assert "# TYPE process_" not in result.stdout
