"""Named groups on the FreeBSD path: kvm_getargv through the fake libkvm, whose kvm_getargv
follows lib/libkvm/kvm_proc.c (kvm_argv): one static buffer that only grows, nchr truncation,
NULL for kernel processes, gone pids and crash dumps; a zombie's cached arguments, as
sys/kern/kern_proc.c sysctl_kern_proc_args returns p_args before looking at P_WEXIT (they are
freed in proc_reap)."""

from __future__ import annotations

import errno
import pathlib
import shutil
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import wait_until
from fakelib import HOST_COUNTERS, fake_libkvm, fixed_passwd  # noqa: F401 (fixture)

from kvm_exporter.config import LibkvmConfig
from kvm_exporter.records import ARGV_BYTES
from kvm_exporter.sources import kvm_cdef
from kvm_exporter.sources.kvm_cdef import ffi
from kvm_exporter.sources.libkvm import LibkvmSource

HOST = (
    """sysctl hw.ncpu 2
sysctl hw.pagesize 4096
sysctl kern.maxproc 6000
sysctl kern.maxthread 100000
loadavg 0.1 0.1 0.1
swap ada0p3 0 1024
proc pid=0 ppid=0 uid=0 stat=SSLEEP threads=20 comm=kernel
proc pid=1 ppid=0 uid=0 stat=SSLEEP rss=10 size=4096 start=1000.0 comm=init argv=/sbin/init
"""
    + HOST_COUNTERS
)
LONG = "x" * 5000
APPS = f"""proc pid=700 ppid=1 uid=0 stat=SSLEEP rss=100 size=40960 start=1100.0 comm=nginx \
argv=nginx:%20master%20process%20/usr/local/sbin/nginx
proc pid=701 ppid=700 uid=80 stat=SRUN threads=2 rss=200 size=40960 start=1101.0 comm=nginx \
argv=nginx:%20worker%20process
proc pid=800 ppid=1 uid=80 stat=SSLEEP rss=300 size=81920 start=1200.0 comm=php-fpm \
argv=php-fpm:%20pool%20www
proc pid=801 ppid=1 uid=80 stat=SSLEEP rss=300 size=81920 start=1201.0 comm=php-fpm \
argv=php-fpm:%20pool%20api
proc pid=802 ppid=1 uid=80 stat=SZOMB start=1202.0 comm=php-fpm argv=php-fpm:%20pool%20api
proc pid=900 ppid=1 uid=1001 stat=SSLEEP rss=50 size=8192 start=1300.0 comm=app \
argv=/usr/local/bin/app|--pad={LONG}|--tail=yes
proc pid=901 ppid=1 uid=1001 stat=SSLEEP rss=50 size=8192 start=1301.0 comm=app \
argv=/usr/local/bin/app|--tail=yes
"""


@pytest.fixture
def getargv(fake_libkvm: pathlib.Path, tmp_path: pathlib.Path) -> Iterator[Any]:  # noqa: F811
    """A private copy of the fake (its statics start empty) and a live handle on a scenario."""
    copy = tmp_path / "libfakekvm-private.so"
    shutil.copy(fake_libkvm, copy)
    lib = kvm_cdef.load(str(copy))
    scenario = tmp_path / "host.scenario"
    scenario.write_text(
        HOST + "proc pid=50 ppid=1 stat=SSLEEP comm=a argv=a|bb|ccc\n"
        "proc pid=51 ppid=1 stat=SSLEEP comm=z argv=zz\n"
        "proc pid=52 ppid=1 stat=SZOMB comm=z argv=zombie\n"
        "proc pid=53 ppid=1 stat=SZOMB comm=z\n"
    )
    errbuf = ffi.new("char[]", 2048)
    handles = []

    def call(pid: int, nchr: int, core: str | None = None) -> Any:
        if not handles or core is not None:
            path = str(scenario).encode() if core else b"/dev/null"
            with pytest.MonkeyPatch.context() as env:
                env.setenv("FAKE_KVM_SCENARIO", str(scenario))
                handles.append(lib.kvm_openfiles(ffi.NULL, path, ffi.NULL, 0, errbuf))
        kd = handles[-1]
        record = ffi.new("struct kinfo_proc_lp64 *")
        record.ki_pid = pid
        return lib, kd, lib.kvm_getargv(kd, record, nchr)

    yield call
    for kd in handles:
        lib.kvm_close(kd)


def strings(vector: Any) -> list[bytes]:
    out = []
    while vector[len(out)] != ffi.NULL:
        out.append(ffi.string(vector[len(out)]))
    return out


def test_fake_getargv_truncates_to_the_first_calls_nchr_then_only_grows(getargv: Any) -> None:
    # "a\0bb\0ccc\0" is 9 bytes: 7 copy "a\0bb\0cc" and the last byte becomes the NUL.
    assert strings(getargv(50, 7)[2]) == [b"a", b"bb", b"c"]
    assert strings(getargv(50, 5)[2]) == [b"a", b"bb", b"c"]  # a smaller nchr: the buffer stays 7
    assert strings(getargv(50, 100)[2]) == [b"a", b"bb", b"ccc"]
    # nchr is no limit after a larger call: the buffer never shrinks.
    assert strings(getargv(50, 3)[2]) == [b"a", b"bb", b"ccc"]


def test_fake_getargv_reuses_one_vector_the_next_call_overwrites(getargv: Any) -> None:
    first = getargv(50, 0)[2]
    second = getargv(51, 0)[2]
    assert first == second  # the same static vector
    assert strings(first) == [b"zz"]  # the first answer is gone


def test_fake_getargv_gives_a_zombie_its_cached_arguments(getargv: Any) -> None:
    """sysctl_kern_proc_args: a zombie's p_args until proc_reap frees them; kvm_argv itself
    looks at no ki_stat (lib/libkvm/kvm_proc.c: only ki_pid is read)."""
    lib, kd, vector = getargv(52, 0)
    assert vector != ffi.NULL and ffi.string(vector[0]) == b"zombie" and vector[1] == ffi.NULL


def test_fake_getargv_returns_null_without_error_text_for_uncached_zombie_kernel_and_gone(
    getargv: Any,
) -> None:
    for pid in (53, 0, 4242):  # 53: a zombie whose arguments were not cached
        lib, kd, vector = getargv(pid, 0)
        assert vector == ffi.NULL
        assert ffi.string(lib.kvm_geterr(kd)) == b""
    assert ffi.errno == errno.ESRCH  # 4242: the sysctl found no such process


def test_fake_getargv_refuses_a_crash_dump(getargv: Any) -> None:
    lib, kd, vector = getargv(50, 0, core="dump")
    assert vector == ffi.NULL
    assert ffi.string(lib.kvm_geterr(kd)) == b"cannot read user space from dead kernel"


@pytest.fixture
def apps(tmp_path: pathlib.Path) -> pathlib.Path:
    """A scenario file of the host and the applications whose argv the rules read."""
    scenario = tmp_path / "apps.scenario"
    scenario.write_text(HOST + APPS)
    return scenario


@pytest.fixture
def source(fake_libkvm: pathlib.Path, apps: pathlib.Path, monkeypatch: Any) -> Any:  # noqa: F811
    monkeypatch.setenv("FAKE_KVM_SCENARIO", str(apps))
    opened = []

    def open_source(**config: Any) -> LibkvmSource:
        opened.append(LibkvmSource(LibkvmConfig(library=str(fake_libkvm), **config)))
        return opened[-1]

    yield open_source, apps
    for s in opened:
        s.close()


def test_source_argv_reads_arguments_cut_at_argv_bytes(source: Any) -> None:
    open_source, _ = source
    live = open_source()
    assert live.argv(701) == ("nginx: worker process",)
    assert live.argv(802) == ("php-fpm: pool api",)  # a zombie keeps its cached p_args
    assert live.argv(0) is None and live.argv(4242) is None
    cut = live.argv(900)
    assert cut is not None and sum(len(a) + 1 for a in cut) == ARGV_BYTES
    assert cut[0] == "/usr/local/bin/app" and cut[1].startswith("--pad=xxx") and len(cut) == 2


def test_a_crash_dump_has_no_arguments(source: Any) -> None:
    open_source, scenario = source
    dump = open_source(kernel="/boot/kernel/kernel", core=str(scenario))
    assert dump.argv(701) is None


CONFIG = """source: libkvm
interval: 1h
libkvm:
  library: {library}
groups:
  process_names:
    - name: "{{{{.Comm}}}}"
      cmdline: ['^nginx: master']
    - name: "php-{{{{.Matches.pool}}}}"
      cmdline: ['^php-fpm: pool (?P<pool>\\w+)']
    - name: "tail-{{{{.Matches.t}}}}"
      cmdline: ['--tail=(?P<t>\\w+)']
    - name: "cut-{{{{.ExeBase}}}}"
      cmdline: ['--pad=']
    - name: "{{{{.ExeBase}}}}-{{{{.Username}}}}"
      comm: [kernel, php-fpm]
"""


def test_exporter_groups_from_the_fakes_argv(
    exporter: Any,
    fake_libkvm: pathlib.Path,  # noqa: F811
    apps: pathlib.Path,
) -> None:
    env = {"FAKE_KVM_SCENARIO": str(apps), **fixed_passwd({0: "root", 80: "www"})}
    got = exporter(CONFIG.format(library=fake_libkvm), env=env).metrics()

    def per_group(name: str) -> dict[str, float]:
        return {dict(k)["group"]: v for (n, k), v in got.items() if n == name}

    assert per_group("kvm_namegroup_processes") == {
        "nginx": 2,  # the worker joins its master (children)
        "php-www": 1,
        "php-api": 2,  # the zombie is named as it was alive: its p_args are still cached
        "tail-yes": 1,
        "cut-app": 1,  # its --tail=yes lies past the 4096 bytes read
        "kernel-root": 1,  # a kernel process has no argv: named by comm
    }
    assert per_group("kvm_namegroup_threads")["nginx"] == 3
    assert per_group("kvm_namegroup_resident_memory_bytes")["nginx"] == 300 * 4096
    assert per_group("kvm_namegroup_oldest_start_time_seconds")["nginx"] == 1100.0
    assert got["kvm_namegroup_argv_unreadable_total", frozenset()] == 1  # pid 0
    assert got[
        "kvm_namegroup_state_processes", frozenset({("group", "nginx"), ("state", "running")})
    ]


def test_sighup_takes_new_rules_and_a_bad_one_keeps_the_old(
    exporter: Any,
    fake_libkvm: pathlib.Path,  # noqa: F811
    apps: pathlib.Path,
) -> None:
    base = f"source: libkvm\ninterval: 0\nlibkvm:\n  library: {fake_libkvm}\n"
    e = exporter(base, env={"FAKE_KVM_SCENARIO": str(apps)})
    assert "kvm_namegroup_processes" not in e.get()  # no rules, no group metrics

    def groups() -> set[str]:
        return {dict(k)["group"] for (n, k) in e.metrics() if n == "kvm_namegroup_processes"}

    for rules, expected in (
        ("{name: '{{.Comm}}', comm: [nginx]}", {"nginx"}),
        ("{name: 'web', comm: [nginx, php-fpm]}", {"web"}),
    ):
        e.config_path.write_text(base + f"groups:\n  process_names: [{rules}]\n")
        e.proc.send_signal(signal.SIGHUP)
        wait_until(lambda expected=expected: groups() == expected, what=str(expected))
    e.config_path.write_text(base + "groups:\n  process_names: [{cmdline: ['nginx++']}]\n")
    e.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "bad regex 'nginx++': bad repetition" in e.stderr(), what="the error")
    assert groups() == {"web"}
