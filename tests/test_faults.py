"""Faults on real running exporters: a source failing once and recovering, a poll slower
than the interval, the port taken, the config file gone before a reload, a full disk for
the log, and privilege (started as root; run as nobody)."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from attack_support import (
    NOBODY,
    Daemon,
    Samples,
    error_lines,
    frozen_proc,
    poll_until,
    running,
    scrape_until,
    series,
    value,
    world_dir,
    write_config,
)
from conftest import SYSTEM_PYTHON
from fakelib import HOST_COUNTERS, build_fake_libkvm

from kvm_exporter.poller import FIRST_POLL_WAIT
from kvm_exporter.sources.procfs import ProcfsSource

SCENARIO = (
    """\
# init, a three-threaded worker and a zombie; one swap device
proc pid=1 uid=0 stat=SSLEEP tdflags=0x8 slptime=30 comm=init
loadavg 0.5 0.25 0.125
proc pid=2 ppid=1 uid=33 stat=SRUN threads=3 comm=worker
swap ada0p3 10 100
proc pid=3 ppid=1 uid=33 stat=SZOMB comm=zombie
sysctl hw.pagesize 4096
sysctl hw.ncpu 4
sysctl kern.maxproc 6000
sysctl kern.maxthread 60000
"""
    + HOST_COUNTERS
)
FAULT_UID = 2_000_097


@pytest.fixture(scope="module")
def fake_lib() -> Iterator[Path]:
    with world_dir() as tmp:
        yield build_fake_libkvm(tmp)


def health(metrics: Samples, part: str) -> tuple[float, float, float]:
    """(kvm_up, success of ``part``, errors of ``part``)."""
    return (
        value(metrics, "kvm_up"),
        value(metrics, "kvm_poll_success", collector=part),
        value(metrics, "kvm_poll_errors_total", collector=part),
    )


DATA = {"procs": "kvm_processes", "loadavg": "kvm_load1", "swap": "kvm_swap_size_bytes"}


@contextmanager
def libkvm_daemon(fake_lib: Path, tmp: Path, directives: str, interval: str) -> Iterator[Daemon]:
    """The exporter on the fake libkvm: SCENARIO plus ``directives`` (failures, delays)."""
    scenario = tmp / "test.scenario"
    scenario.write_text(SCENARIO + directives)
    config = write_config(
        tmp, f"source: libkvm\ninterval: {interval}\nlibkvm: {{library: {fake_lib}}}\n"
    )
    with running(config, env={"FAKE_KVM_SCENARIO": str(scenario)}) as daemon:
        yield daemon


def assert_sigterm_exits_promptly(daemon: Daemon) -> None:
    daemon.signal(signal.SIGTERM)
    started = time.monotonic()
    assert daemon.proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize(
    ("call", "part"), [("getprocs", "procs"), ("loadavg", "loadavg"), ("swapinfo", "swap")]
)
def test_libkvm_fails_once_and_recovers(fake_lib: Path, call: str, part: str) -> None:
    """Interval 0: every scrape is a poll, so poll 2 is the first scrape, deterministically.
    The failed part's data is absent (not the last good value), kvm_up 0, the error counted
    and logged with libkvm's text; the next poll is whole again."""
    faults = f"fail {call} 2 injected fault number two\nfail {call} 3 and three\n"
    with world_dir() as tmp, libkvm_daemon(fake_lib, tmp, faults, "0") as daemon:
        first = daemon.metrics()  # poll 2 (the start-up poll was 1)
        assert health(first, part) == (0, 0, 1)
        assert series(first, DATA[part]) == {}
        assert all(series(first, name) for p, name in DATA.items() if p != part)
        assert value(first, "kvm_polls_total") == 2
        ready = urllib.request.Request(daemon.url + "/-/ready")
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(ready, timeout=30)
        assert not_ready.value.code == 503  # /-/ready ran poll 3, failing too
        second = daemon.metrics()  # poll 4
        assert health(second, part) == (1, 1, 2)
        assert all(series(second, name) for name in DATA.values())
        assert value(second, "kvm_processes", user="root", tty="none", state="idle") == 1
        assert value(second, "kvm_last_successful_poll_timestamp_seconds") > value(
            first, "kvm_last_successful_poll_timestamp_seconds"
        )
        log = error_lines(daemon.stderr())
        assert len(log) == 2 and all(f"poll of {part} failed" in line for line in log), log
        if part != "loadavg":  # a failing kvm_getloadavg sets no error text, as libkvm
            assert "injected fault number two" in log[0] and "and three" in log[1]


def test_libkvm_failing_on_the_poller_thread(fake_lib: Path) -> None:
    """Interval > 0: getprocs fails on polls 3 and 4; the poller thread goes on."""
    faults = "fail getprocs 3 third\nfail getprocs 4 fourth\n"
    with world_dir() as tmp, libkvm_daemon(fake_lib, tmp, faults, "0.3") as daemon:
        down = scrape_until(
            daemon,
            lambda m: value(m, "kvm_up") == 0,
            what="the failed poll",
        )
        assert series(down, "kvm_processes") == {} and series(down, "kvm_threads") == {}
        up = scrape_until(
            daemon,
            lambda m: value(m, "kvm_polls_total") >= 5,
            what="polls after the failure",
        )
        assert health(up, "procs") == (1, 1, 2)
        assert sum(series(up, "kvm_processes").values()) == 3


def small_proc(dest: Path) -> int:
    """A frozen procfs copy with this test's own process and a few others."""
    pids = {os.getpid(), os.getppid(), 1}
    return frozen_proc(dest, pids)["_procs"]


@pytest.mark.parametrize(
    ("fault", "part"),
    [
        ("loadavg-removed", "loadavg"),
        ("stat-garbage", "procs"),
        ("stat-truncated", "procs"),
        ("swaps-garbage", "swap"),
        ("pid-max-garbage", "limits"),
    ],
)
def test_procfs_breaks_and_is_repaired(fault: str, part: str) -> None:
    """A procfs copy broken under a running exporter (interval 0.2 s, the poller thread):
    kvm_up 0, the error counted, no stale data of the broken part; repaired, kvm_up 1."""
    with world_dir() as tmp:
        root = tmp / "proc"
        count = small_proc(root)
        pid = os.getpid()
        config = write_config(tmp, f"interval: 0.2\nprocfs: {{root: {root}}}\n")
        with running(config) as daemon:
            good = scrape_until(
                daemon,
                lambda m: value(m, "kvm_up") == 1,
                what="a whole first poll",
            )
            assert sum(series(good, "kvm_processes").values()) == count
            broken = {
                "loadavg-removed": ("loadavg", None),
                "stat-garbage": (f"{pid}/stat", b"garbage\n"),
                "stat-truncated": (f"{pid}/stat", b"%d (x) S 1\n" % pid),
                "swaps-garbage": ("swaps", b"Filename\tType\tSize\n/dev/x partition\n"),
                "pid-max-garbage": ("sys/kernel/pid_max", b"many\n"),
            }[fault]
            path = root / broken[0]
            saved = path.read_bytes()
            if broken[1] is None:
                path.unlink()
            else:
                path.write_bytes(broken[1])
            down = scrape_until(
                daemon,
                lambda m: value(m, "kvm_up") == 0,
                what=f"the poll that sees {fault}",
            )
            assert value(down, "kvm_poll_success", collector=part) == 0
            assert value(down, "kvm_poll_errors_total", collector=part) >= 1
            data = {
                "procs": "kvm_processes",
                "loadavg": "kvm_load1",
                "swap": "kvm_swap_size_bytes",
                "limits": "kvm_processes_limit",
            }[part]
            assert series(down, data) == {}, "stale data served after a failed poll"
            path.write_bytes(saved)
            polls = value(down, "kvm_polls_total")
            up = scrape_until(
                daemon,
                lambda m: value(m, "kvm_up") == 1,
                what="recovery after repair",
            )
            assert value(up, "kvm_polls_total") > polls
            assert sum(series(up, "kvm_processes").values()) == count
            errors = error_lines(daemon.stderr())
            assert errors and all(f"poll of {part} failed" in line for line in errors), errors
            assert not any("Traceback" in line for line in errors)
            assert daemon.proc.poll() is None


class SlowFile:
    """A FIFO in place of a procfs file: each open blocks until the feeder thread answers,
    once every ``period`` seconds, so every poll takes about ``period``."""

    def __init__(self, path: Path, content: bytes, period: float) -> None:
        path.unlink()
        os.mkfifo(path, 0o644)
        self.path, self.content, self.period = path, content, period
        self.served = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._feed, daemon=True)
        self._thread.start()

    def _feed(self) -> None:
        while not self._stop.wait(self.period):
            while not self._stop.is_set():
                try:  # non-blocking: succeeds only once a reader has it open
                    fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
                except OSError as err:
                    if err.errno != errno.ENXIO:
                        raise
                    time.sleep(0.01)
                    continue
                try:
                    os.write(fd, self.content)
                finally:
                    os.close(fd)
                self.served += 1
                break

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def test_poll_slower_than_interval_does_not_pile_up() -> None:
    """Interval 0.1 s, each poll about 1 s: polls run back to back, never more than one per
    poll duration, and scrapes keep answering at once from the last snapshot."""
    period = 1.0
    with world_dir() as tmp:
        root = tmp / "proc"
        small_proc(root)
        slow = SlowFile(root / "sys" / "kernel" / "threads-max", b"63000\n", period)
        try:
            config = write_config(tmp, f"interval: 0.1\nprocfs: {{root: {root}}}\n")
            with running(config) as daemon:
                first = scrape_until(
                    daemon,
                    lambda m: value(m, "kvm_polls_total") >= 2,
                    what="two slow polls",
                )
                start, polls = time.monotonic(), value(first, "kvm_polls_total")
                latencies = []
                while time.monotonic() - start < 5.0:
                    t0 = time.monotonic()
                    metrics = daemon.metrics()
                    latencies.append(time.monotonic() - t0)
                    time.sleep(0.1)
                elapsed = time.monotonic() - start
                grown = value(metrics, "kvm_polls_total") - polls
                assert 1 <= grown <= elapsed / period + 1, (grown, elapsed)
                assert value(metrics, "kvm_poll_duration_seconds", collector="limits") >= 0.5
                assert value(metrics, "kvm_up") == 1
                assert sorted(latencies)[len(latencies) // 2] < 0.5, latencies
                assert max(latencies) < period, "a scrape waited for the slow poll"
                # nothing queued up behind the slow file: one reader at a time
                assert slow.served <= value(metrics, "kvm_polls_total") + 1
        finally:
            slow.stop()


def only_line(log: str) -> str:
    lines = log.strip().splitlines()
    assert len(lines) == 1, lines
    assert "Traceback" not in log
    return lines[0]


def test_port_already_taken() -> None:
    """Exit 1 with one error line naming the address; no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # the later --web.listen-address wins over the one Daemon picks
        daemon = Daemon(None, f"--web.listen-address=127.0.0.1:{port}", wait=False)
        try:
            assert daemon.proc.wait(timeout=60) == 1, daemon.stderr()
            log = daemon.stderr()
        finally:
            daemon.stop()
    lines = [line for line in log.splitlines() if "level=warn" not in line]  # the root warning
    line = only_line("\n".join(lines))
    assert "level=error" in line and f"127.0.0.1:{port}" in line, line
    assert "in use" in line.lower(), line


def reload_status(daemon: Daemon) -> tuple[float, float, float]:
    metrics = daemon.metrics()
    return (
        value(metrics, "kvm_config_reload_failures_total"),
        value(metrics, "kvm_config_last_reload_successful"),
        value(metrics, "kvm_up"),
    )


def test_config_deleted_before_reload() -> None:
    with world_dir() as tmp:
        config = write_config(tmp, "interval: 1h\nlabels: [user, state]\n")
        with running(config) as daemon:
            config.unlink()
            daemon.signal(signal.SIGHUP)
            poll_until(lambda: reload_status(daemon) == (1, 0, 1), what="the failed reload")
            assert any("user" in dict(k) for k in series(daemon.metrics(), "kvm_processes"))
            errors = error_lines(daemon.stderr())
            assert len(errors) == 1 and str(config) in errors[0], errors
            assert "No such file" in errors[0]
            write_config(tmp, "interval: 1h\nlabels: [state]\n")
            daemon.signal(signal.SIGHUP)
            poll_until(lambda: reload_status(daemon) == (1, 1, 1), what="the good reload")
            assert daemon.proc.poll() is None


def test_log_to_full_disk_keeps_serving() -> None:
    """stderr on /dev/full (every write fails with ENOSPC): start, scrapes, 404s, a failed
    reload and a failed poll all log, and the exporter goes on serving."""
    with world_dir() as tmp:
        root = tmp / "proc"
        small_proc(root)
        config = write_config(tmp, f"interval: 0.2\nprocfs: {{root: {root}}}\n")
        with running(config, stderr="/dev/full") as daemon:
            for _ in range(3):
                assert value(daemon.metrics(), "kvm_up") == 1
            with pytest.raises(urllib.error.HTTPError):
                daemon.get("/nowhere")
            (root / "loadavg").rename(root / "loadavg.saved")  # poll errors get logged
            poll_until(lambda: value(daemon.metrics(), "kvm_up") == 0, what="a failed poll")
            (root / "loadavg.saved").rename(root / "loadavg")
            config.write_text("interval: [\n")
            daemon.signal(signal.SIGHUP)
            poll_until(
                lambda: value(daemon.metrics(), "kvm_config_reload_failures_total") == 1,
                what="the failed reload",
            )
            poll_until(lambda: value(daemon.metrics(), "kvm_up") == 1, what="recovery")
            assert daemon.proc.poll() is None
            assert daemon.stop() == 0


def test_started_as_root_warns_once() -> None:
    assert os.geteuid() == 0, "the tests run as root (tests/run.sh)"
    with world_dir() as tmp, running(write_config(tmp, "interval: 1h\n")) as daemon:
        warnings = [line for line in daemon.stderr().splitlines() if "level=warn" in line]
        assert len(warnings) == 1, warnings
        assert "root" in warnings[0] and "unprivileged user" in warnings[0]


@pytest.fixture
def fault_procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Three sleepers of FAULT_UID, one of them stopped, and a zombie's parent."""
    owner = {"user": FAULT_UID, "group": FAULT_UID, "extra_groups": []}
    zombie = "import os, time\nif os.fork() == 0: os._exit(0)\ntime.sleep(600)"
    procs = [subprocess.Popen(["sleep", "600"], **owner) for _ in range(3)]
    procs.append(subprocess.Popen([SYSTEM_PYTHON, "-c", zombie], **owner))
    try:
        os.kill(procs[0].pid, signal.SIGSTOP)
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def root_count() -> int:
    return sum(1 for p in ProcfsSource().procs() if p.uid == 0)


def test_runs_as_nobody_with_full_counts(fault_procs: list[subprocess.Popen[bytes]]) -> None:
    """Run as uid 65534 with no privilege: no root warning, and the counts of another user's
    processes and of root's own are those a root reader sees."""
    with world_dir() as tmp:
        config = write_config(tmp, "interval: 0\n")
        with running(config, user=NOBODY) as daemon:
            status = Path(f"/proc/{daemon.proc.pid}/status").read_text()
            uids = next(line for line in status.splitlines() if line.startswith("Uid:"))
            assert uids.split()[1:] == [str(NOBODY)] * 4
            assert (
                next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1]
                == "0000000000000000"
            )
            user = str(FAULT_UID)

            def counted() -> Samples | None:
                metrics = daemon.metrics()
                mine = {
                    dict(k)["state"]: v
                    for k, v in series(metrics, "kvm_processes").items()
                    if ("user", user) in k
                }
                assert mine == {"sleeping": 3, "stopped": 1, "zombie": 1}, mine
                return metrics

            metrics = poll_until(counted, what="the test processes counted as nobody")
            assert value(metrics, "kvm_up") == 1

            def roots_match() -> bool:
                # root's processes come and go with other tests: within 10% of a root reader
                # (an unprivileged reader shut out of them would see next to none)
                served = sum(
                    v
                    for k, v in series(daemon.metrics(), "kvm_processes").items()
                    if ("user", "root") in k
                )
                return abs(served - root_count()) <= 0.1 * served

            poll_until(roots_match, what="root's processes counted as nobody")
            assert daemon.stderr().strip() == "" or all(
                "level=info" in line for line in daemon.stderr().splitlines()
            ), daemon.stderr()


def test_sighup_storm_while_scraping() -> None:
    """Bursts of 100 SIGHUPs, first on a bad config then on a good one, with scrapes between:
    the exporter keeps serving, counts the failed reloads, loads the good one, stops cleanly."""
    with world_dir() as tmp:
        root = tmp / "proc"
        small_proc(root)  # cheap polls: every scrape polls at interval 0
        procfs = f"procfs: {{root: {root}}}\n"
        config = write_config(tmp, "interval: 0\nlabels: [state]\n" + procfs)
        with running(config) as daemon:
            config.write_text("interval: [\n")
            for _ in range(100):
                daemon.signal(signal.SIGHUP)
            scrape_until(
                daemon,
                lambda m: value(m, "kvm_config_reload_failures_total") >= 1,
                what="the failed reloads",
            )
            config.write_text("interval: 0\nlabels: [user]\n" + procfs)
            for i in range(100):
                daemon.signal(signal.SIGHUP)
                if i % 10 == 0:
                    assert value(daemon.metrics(), "kvm_up") == 1
            metrics = scrape_until(
                daemon,
                lambda m: (
                    value(m, "kvm_config_last_reload_successful") == 1
                    and any("user" in dict(k) for k in series(m, "kvm_processes"))
                ),
                what="the good reload",
            )
            assert value(metrics, "kvm_up") == 1
            assert not any("Traceback" in line for line in daemon.stderr().splitlines())
            assert daemon.stop() == 0


def test_source_hung_at_start_up_serves_without_data_and_stops() -> None:
    """The first poll hangs (swaps is a FIFO nobody writes): the exporter listens anyway,
    a scrape waits FIRST_POLL_WAIT for the poll and then gets kvm_up 0 and no data, and
    SIGTERM still exits 0 within 2 s."""
    with world_dir() as tmp:
        root = tmp / "proc"
        small_proc(root)
        (root / "swaps").unlink()
        os.mkfifo(root / "swaps", 0o644)
        config = write_config(tmp, f"interval: 1\nprocfs: {{root: {root}}}\n")
        with running(config) as daemon:
            started = time.monotonic()
            metrics = daemon.metrics()
            assert time.monotonic() - started >= FIRST_POLL_WAIT / 2  # it waited for the poll
            assert value(metrics, "kvm_up") == 0
            assert series(metrics, "kvm_processes") == {}
            assert value(metrics, "kvm_polls_total") == 0
            assert_sigterm_exits_promptly(daemon)


def test_libkvm_hung_at_start_up_serves_without_data_and_stops(fake_lib: Path) -> None:
    """kvm_getprocs stalls for 30 s from the first call: the exporter serves kvm_up 0 and no
    data after the first-poll wait, and SIGTERM still exits 0 at once, leaving the handle
    that the stalled call holds to the process's exit."""
    with world_dir() as tmp, libkvm_daemon(fake_lib, tmp, "delay getprocs 30\n", "1") as daemon:
        metrics = daemon.metrics()
        assert value(metrics, "kvm_up") == 0
        assert series(metrics, "kvm_processes") == {}
        assert_sigterm_exits_promptly(daemon)
        assert "libkvm busy" in daemon.stderr()


def test_a_poll_slower_than_the_interval_is_counted_and_scrapes_do_not_wait(
    fake_lib: Path,
) -> None:
    """kvm_getprocs takes 3 s on every poll, the interval is 2 s: each scrape meanwhile
    answers at once from the last poll's data (still fresh: kvm_up 1; polls end 4 s apart,
    data expires after 5), and each overrun is counted and logged."""
    with world_dir() as tmp, libkvm_daemon(fake_lib, tmp, "delay getprocs 3\n", "2") as daemon:
        daemon.metrics()  # waits for the first poll
        slowest = 0.0
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            started = time.monotonic()
            metrics = daemon.metrics()
            slowest = max(slowest, time.monotonic() - started)
            assert value(metrics, "kvm_up") == 1
            time.sleep(0.1)
        assert slowest < 1.0  # measured: about 10 ms; a scrape waiting for a poll: up to 3 s
        assert value(metrics, "kvm_poll_overruns_total") >= 2
        assert value(metrics, "kvm_poll_duration_seconds", collector="procs") >= 3
        log = daemon.stderr()
        assert "poll took 3." in log and "longer than the 2s interval" in log
