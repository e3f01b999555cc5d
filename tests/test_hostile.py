"""Attacks a local user can make on the exporter, with real processes on the live /proc.

- process names (comm) with quotes, backslashes, newlines, invalid UTF-8, ``)`` and spaces,
  and ``) R 1 2 3`` tricks, set with ``prctl(PR_SET_NAME)`` and by exec'ing a copy of
  ``sleep`` under a hostile file name;
- a cardinality bomb: hundreds of distinct uids and pseudo-terminals against ``max_series``;
- churn: processes and threads appearing and vanishing while the exporter scans.

The exporter runs as a real process on loopback; each exposition must pass
``promtool check metrics`` and prometheus_client's parsers, and the counts must hold.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
import urllib.error
from collections import Counter
from collections.abc import Iterator

import pytest
from attack_support import (
    OPENMETRICS,
    Samples,
    check_exposition,
    check_openmetrics,
    error_lines,
    frozen_proc,
    poll_until,
    running,
    series,
    value,
    world_dir,
    write_config,
)
from conftest import SYSTEM_PYTHON, samples
from prometheus_client import CollectorRegistry, generate_latest

from kvm_exporter.aggregate import OTHER, aggregate
from kvm_exporter.collector import KvmCollector, ReloadStatus
from kvm_exporter.poller import Snapshot
from kvm_exporter.records import HostLimits, LoadAvg, Proc, SwapDevice, census_of
from kvm_exporter.sources.procfs import ProcfsSource
from kvm_exporter.states import STATES

HOSTILE_UID = 2_000_101
"""No passwd entry: its processes are labelled with the number."""
UID_BASE = 2_000_200
PTY_UID = 2_000_099
CHURN_UID = 2_000_098
CAP = 50

HOSTILE_COMMS = [
    b'a"b\\c',
    b"x\ny",
    b"\xff\xfe\xc3(",
    b") R 1 2 3",
    b"x) Z 0 0 (",
    b"( (",
    b"   ",
    b'user="root"}',
    b'\\n\\\\"\t',
    b"# HELP kvm_up\n",
    b"kvm_up 0\n",
    b"\xe2\x80\xae)rtl",
    b"",
]
"""Names set with prctl: at most 15 bytes, anything but NUL."""

HOSTILE_FILES = [b'q"uote', b"back\\slash", b"new\nline", b"\xff\xfebad", b"x) S 1 2 3", b" ) "]
"""File names of copies of sleep(1): their first 15 bytes become the comm."""

SET_NAME = (
    "import ctypes, sys, time\n"
    "ctypes.CDLL(None).prctl(15, ctypes.c_char_p(bytes.fromhex(sys.argv[1])), 0, 0, 0)\n"
    "time.sleep(600)\n"
)


def comm_of(pid: int) -> bytes | None:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read()[:-1]
    except FileNotFoundError:
        return None


def asleep(pid: int) -> bool:
    """Whether ``pid`` is in an interruptible sleep (a child just started may still run)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] == b"S"
    except FileNotFoundError:
        return False


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


@pytest.fixture
def hostile() -> Iterator[dict[int, bytes]]:
    """Sleepers of HOSTILE_UID with hostile names: pid -> the comm it set."""
    procs: list[subprocess.Popen[bytes]] = []
    expected: dict[int, bytes] = {}
    as_hostile = {"user": HOSTILE_UID, "group": HOSTILE_UID, "extra_groups": []}
    with world_dir() as tmp:
        try:
            for name in HOSTILE_COMMS:
                p = subprocess.Popen([SYSTEM_PYTHON, "-c", SET_NAME, name.hex()], **as_hostile)
                procs.append(p)
                expected[p.pid] = name
            for name in HOSTILE_FILES:
                path = os.path.join(os.fsencode(tmp), name)
                shutil.copy(b"/bin/sleep", path)
                os.chmod(path, 0o755)
                p = subprocess.Popen([path, "600"], **as_hostile)
                procs.append(p)
                expected[p.pid] = name[:15]
            poll_until(
                lambda: all(comm_of(pid) == name and asleep(pid) for pid, name in expected.items()),
                what="every child to carry its hostile name and sleep",
            )
            yield expected
        finally:
            stop_all(procs)


def test_source_reads_hostile_names(hostile: dict[int, bytes]) -> None:
    procs = {p.pid: p for p in ProcfsSource().procs() if p.pid in hostile}
    assert sorted(procs) == sorted(hostile)
    for pid, name in hostile.items():
        p = procs[pid]
        assert p.comm == name.decode("utf-8", "replace")
        assert (p.uid, p.ruid, p.tty, p.state) == (HOSTILE_UID, HOSTILE_UID, "none", "sleeping")
        assert p.threads == 1


def test_exporter_serves_valid_exposition_with_hostile_names(hostile: dict[int, bytes]) -> None:
    with world_dir() as tmp:
        config = write_config(tmp, "interval: 0\n")
        with running(config) as daemon:
            text = daemon.get()
            metrics = check_exposition(text)
            check_openmetrics(daemon.get(accept=OPENMETRICS))
            user = str(HOSTILE_UID)
            ours = {
                k: v for k, v in series(metrics, "kvm_processes").items() if ("user", user) in k
            }
            assert ours == {
                frozenset({("user", user), ("tty", "none"), ("state", "sleeping")}): len(hostile)
            }
            assert value(metrics, "kvm_up") == 1
            # process names never reach a label: every value is a user, a tty or a state
            for key in series(metrics, "kvm_processes"):
                for label, word in key:
                    assert re.fullmatch(r"[A-Za-z0-9_./:-]+", word), (label, word)
            assert error_lines(daemon.stderr()) == []
            assert daemon.proc.poll() is None


@pytest.fixture(scope="module")
def crowd() -> Iterator[dict[str, int]]:
    """300 sleepers of distinct uids and 120 more each on a terminal of its own."""
    procs: list[subprocess.Popen[bytes]] = []
    masters: list[int] = []
    try:
        for i in range(300):
            uid = UID_BASE + i
            procs.append(subprocess.Popen(["sleep", "600"], user=uid, group=uid, extra_groups=[]))
        for _ in range(120):
            master, slave = os.openpty()
            masters.append(master)
            # setsid -c: a new session whose controlling terminal is stdin (TIOCSCTTY)
            procs.append(
                subprocess.Popen(
                    ["setsid", "-c", "sleep", "600"],
                    stdin=slave,
                    user=PTY_UID,
                    group=PTY_UID,
                    extra_groups=[],
                )
            )
            os.close(slave)
        pids = {p.pid for p in procs}

        def all_settled() -> bool:
            mine = [p for p in ProcfsSource().procs() if p.pid in pids]
            return len(mine) == len(pids) and all(
                p.comm == "sleep" and p.state == "sleeping" for p in mine
            )

        poll_until(all_settled, what="420 sleepers, 120 of them on terminals")
        yield {"uids": 300, "ttys": 120, "pids": len(pids)}
    finally:
        stop_all(procs)
        for master in masters:
            os.close(master)


def test_crowd_is_real(crowd: dict[str, int]) -> None:
    mine = [p for p in ProcfsSource().procs() if p.uid == PTY_UID]
    ttys = {p.tty for p in mine}
    assert len(ttys) >= crowd["ttys"] and all(t.startswith("pts/") for t in ttys)


def check_capped(metrics: Samples, labels: set[str]) -> None:
    for name in ("kvm_processes", "kvm_threads"):
        got = series(metrics, name)
        assert len(got) <= CAP, (name, len(got))
        assert all({k for k, _ in key} == labels for key in got)
    assert value(metrics, "kvm_processes_folded_groups") > 0


def test_cardinality_bomb_live(crowd: dict[str, int]) -> None:
    """On the live /proc: at most CAP series per metric, groups folded, output valid."""
    with world_dir() as tmp:
        config = write_config(tmp, f"interval: 0\nmax_series: {CAP}\n")
        with running(config) as daemon:
            metrics = check_exposition(daemon.get())
            check_openmetrics(daemon.get(accept=OPENMETRICS))
            check_capped(metrics, {"user", "tty", "state"})
            folded = value(metrics, "kvm_processes_folded_groups")
            assert folded >= crowd["uids"] + crowd["ttys"] - CAP
            procs = series(metrics, "kvm_processes")
            assert sum(procs.values()) >= crowd["uids"] + crowd["ttys"]
            # every state keeps a series; the folded ones sit under user=other, tty=other
            assert {dict(k)["state"] for k in procs} == set(STATES)
            other = {k: v for k, v in procs.items() if ("user", OTHER) in k}
            assert other[frozenset({("user", OTHER), ("tty", OTHER), ("state", "sleeping")})] > 0
            assert value(metrics, "kvm_up") == 1
            assert error_lines(daemon.stderr()) == []


@pytest.mark.parametrize("labels", [["user", "tty", "state"], ["user"], ["tty", "state"]])
def test_cardinality_bomb_totals_conserved(crowd: dict[str, int], labels: list[str]) -> None:
    """On a frozen copy of /proc: the sums of kvm_processes and kvm_threads equal the copied
    processes and threads exactly, per state too, with the cap holding."""
    with world_dir() as tmp:
        # the crowd and a few hundred others: all kernel threads, root's and nobody's
        live = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        crowd_pids = {p.pid for p in ProcfsSource().procs() if p.uid >= PTY_UID}
        expected = frozen_proc(tmp / "proc", crowd_pids | set(live[:400]))
        assert expected["_procs"] >= crowd["pids"]
        config = write_config(
            tmp,
            f"interval: 0\nmax_series: {CAP}\nlabels: [{', '.join(labels)}]\n"
            f"procfs: {{root: {tmp / 'proc'}}}\n",
        )
        with running(config) as daemon:
            metrics = check_exposition(daemon.get())
            check_capped(metrics, set(labels))
            procs = series(metrics, "kvm_processes")
            assert sum(procs.values()) == expected["_procs"]
            assert sum(series(metrics, "kvm_threads").values()) == expected["_threads"]
            if "state" in labels:
                per_state: Counter[str] = Counter()
                for key, count in procs.items():
                    per_state[dict(key)["state"]] += int(count)
                assert per_state == Counter({s: expected[s] for s in STATES if expected[s]})


def test_cardinality_cap_holds_for_every_cap(crowd: dict[str, int]) -> None:
    """Pure check of the same data for every cap from MIN_SERIES up: never over the cap."""
    procs = ProcfsSource().procs()
    for cap in (14, 15, 20, 37, 50, 100, 400):
        for labels in (("user", "tty", "state"), ("user",), ("tty",), ("user", "tty")):
            counts = aggregate(census_of(procs), labels, cap)
            assert len(counts.processes) <= cap, (cap, labels)
            assert sum(counts.processes.values()) == len(procs)
            assert sum(counts.threads.values()) == sum(p.threads for p in procs)


CHURN = """
import os, sys, threading, time
end = time.monotonic() + float(sys.argv[1])
forks = 0
while time.monotonic() < end:
    pids = []
    for i in range(16):
        pid = os.fork()
        if pid == 0:
            if i % 4 == 0:
                threading.Thread(target=time.sleep, args=(0.002,)).start()
            elif i % 4 == 1:
                time.sleep(0.002)
            os._exit(0)
        pids.append(pid)
    for pid in pids[:8]:
        os.waitpid(pid, 0)
    time.sleep(0.001)  # the rest linger as zombies for a moment
    for pid in pids[8:]:
        os.waitpid(pid, 0)
    forks += len(pids)
print(forks)
"""


def test_churn_while_scanning() -> None:
    """Processes and threads come and go while the exporter scans at interval 0 and many
    scrapes arrive at once: every scrape answers, parses and says kvm_up 1; no error line."""
    seconds = 12.0
    churners = [
        subprocess.Popen(
            [SYSTEM_PYTHON, "-c", CHURN, str(seconds)],
            stdout=subprocess.PIPE,
            user=CHURN_UID,
            group=CHURN_UID,
            extra_groups=[],
        )
        for _ in range(2)
    ]
    failures: list[str] = []
    seen: list[float] = []
    scrapes: list[int] = [0]
    try:
        with world_dir() as tmp:
            config = write_config(tmp, "interval: 0\nmax_series: 2000\n")
            with running(config) as daemon:
                # the source on its own, in a tight loop, in this process too
                source = ProcfsSource()
                end = time.monotonic() + 2.0
                while time.monotonic() < end:
                    source.procs()

                def scrape() -> None:
                    while any(c.poll() is None for c in churners):
                        try:
                            metrics = samples(daemon.get())
                        except (OSError, urllib.error.URLError, ValueError) as err:
                            failures.append(f"{type(err).__name__}: {err}")
                            continue
                        scrapes[0] += 1
                        if metrics.get(("kvm_up", frozenset())) != 1:
                            failures.append(f"kvm_up {metrics.get(('kvm_up', frozenset()))}")
                        churned = series(metrics, "kvm_processes")
                        seen.append(
                            sum(v for k, v in churned.items() if ("user", str(CHURN_UID)) in k)
                        )

                scrapers = [threading.Thread(target=scrape) for _ in range(3)]
                for t in scrapers:
                    t.start()
                for t in scrapers:
                    t.join(timeout=seconds + 60)
                forks = sum(int(c.communicate(timeout=30)[0] or 0) for c in churners)
                assert failures == []
                assert scrapes[0] >= 3, scrapes
                assert forks > 500, forks
                assert max(seen) > 0, "no scrape saw a churned process"
                check_exposition(daemon.get())
                assert daemon.proc.poll() is None
                assert error_lines(daemon.stderr()) == []
    finally:
        stop_all(churners)


SWAPS = {
    "/swap\\040with\\040spaces": "/swap with spaces",
    '/tmp/q"uote\\134back\\012line': '/tmp/q"uote\\back\nline',
    "/tab\\011here": "/tab\there",
    '/x{a="b",c=}': '/x{a="b",c=}',
    "/dev/sda2": "/dev/sda2",
    "/swap-caf\u00e9": "/swap-caf\u00e9",
    "/swap-\udcff": "/swap-\ufffd",
}
"""/proc/swaps names as the kernel writes them (space, tab, newline and backslash escaped as
octal; other bytes raw, UTF-8 or not) -> the device label they must give."""


def test_hostile_swap_device_names_are_escaped() -> None:
    """Swap device names are the one label value read from a file name: quotes, braces,
    backslashes and newlines must come out escaped and read back exactly."""
    with world_dir() as tmp:
        root = tmp / "proc"
        frozen_proc(root, {1, os.getpid()})
        lines = ["Filename\tType\tSize\tUsed\tPriority"]
        lines += [f"{raw}\tfile\t{4 * i + 4}\t{i}\t-2" for i, raw in enumerate(SWAPS)]
        (root / "swaps").write_bytes(os.fsencode("\n".join(lines) + "\n"))  # é as UTF-8
        config = write_config(tmp, f"interval: 0\nprocfs: {{root: {root}}}\n")
        with running(config) as daemon:
            metrics = check_exposition(daemon.get())
            check_openmetrics(daemon.get(accept=OPENMETRICS))
            size = {dict(k)["device"]: v for k, v in series(metrics, "kvm_swap_size_bytes").items()}
            assert size == {name: (4 * i + 4) * 1024 for i, name in enumerate(SWAPS.values())}
            assert value(metrics, "kvm_up") == 1


def test_names_that_are_not_utf8_do_not_break_the_exposition() -> None:
    """User names (passwd, NSS), terminal names (/dev) and swap file names are bytes; Python
    decodes bytes that are not UTF-8 to lone surrogates, which no exposition can carry. They
    come out as U+FFFD, and names that become equal are merged, not served twice."""
    latin1 = {1: os.fsdecode(b"caf\xe9"), 2: os.fsdecode(b"caf\xe8"), 3: "ok"}
    tty = os.fsdecode(b"tty\xff")
    procs = [
        Proc(10 + i, 1, uid, uid, tty if i % 2 else "none", "sleeping", "x", 2, 0, 0, 0.0, 0.0)
        for i, uid in enumerate([1, 1, 2, 2, 3, 3])
    ]
    counts = aggregate(census_of(procs), ("user", "tty", "state"), 1000, latin1.__getitem__)
    swap = (SwapDevice(os.fsdecode(b"/swap\xff"), 4096, 0), SwapDevice("/swap2", 8192, 0))
    parts = dict.fromkeys(("procs", "loadavg", "swap", "limits"), True)
    snap = Snapshot(
        counts, LoadAvg(0, 0, 0), swap, HostLimits(1, 1, 1), parts, dict.fromkeys(parts, 0.0),
        time.time(), time.time(), 1,
    )  # fmt: skip
    registry = CollectorRegistry()
    registry.register(
        KvmCollector(lambda: snap, lambda: "procfs", lambda: ReloadStatus(True, 0, 0))
    )
    metrics = check_exposition(generate_latest(registry).decode("utf-8"))
    procs_served = series(metrics, "kvm_processes")
    assert sum(procs_served.values()) == len(procs)
    assert sum(series(metrics, "kvm_threads").values()) == 2 * len(procs)
    sleeping = {(dict(k)["user"], dict(k)["tty"]): v for k, v in procs_served.items() if v}
    assert sleeping == {
        ("caf\ufffd", "none"): 2,
        ("caf\ufffd", "tty\ufffd"): 2,
        ("ok", "none"): 1,
        ("ok", "tty\ufffd"): 1,
    }
    devices = {dict(k)["device"] for k in series(metrics, "kvm_swap_size_bytes")}
    assert devices == {"/swap\ufffd", "/swap2"}
