"""Real processes on the live /proc, counted by a real exporter and compared with ps."""

from __future__ import annotations

import os
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import SYSTEM_PYTHON, wait_until

from kvm_exporter.sources.procfs import ProcfsSource
from kvm_exporter.states import STATES, linux_state

NOBODY = 65534
SLEEP = "import time; time.sleep(600)"
THREADED = (
    "import threading, time\n"
    + "".join(
        "threading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n" for _ in range(4)
    )
    + "time.sleep(600)"
)
# The parent never reaps its child, which stays a zombie as long as the parent lives.
ZOMBIE_PARENT = "import os, time\nif os.fork() == 0: os._exit(0)\ntime.sleep(600)"
# A session leader whose stdin is a pty slave takes it as controlling terminal.
ON_PTY = "import fcntl, termios, time; fcntl.ioctl(0, termios.TIOCSCTTY, 0); time.sleep(600)"
# Effective uid nobody, real uid 65533: ps and the exporter must both show the effective one.
SETEUID = f"import os, time; os.setresuid(65533, {NOBODY}, {NOBODY}); time.sleep(600)"


def spawn(code: str, **kw: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([SYSTEM_PYTHON, "-c", code], **kw)


@pytest.fixture
def nobody_procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Sleepers, a stopped one, a zombie's parent, a threaded one, one on a pty; all nobody."""
    master, slave = os.openpty()
    procs = [spawn(SLEEP, user=NOBODY) for _ in range(3)]
    procs.append(spawn(SLEEP, user=NOBODY))
    procs.append(spawn(ZOMBIE_PARENT, user=NOBODY))
    procs.append(spawn(THREADED, user=NOBODY))
    procs.append(spawn(ON_PTY, user=NOBODY, stdin=slave, start_new_session=True))
    procs.append(spawn(SETEUID))
    os.close(slave)
    os.kill(procs[3].pid, signal.SIGSTOP)
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()
        os.close(master)


Row = tuple[int, int, int, int, str, str, int]
"""(pid, ppid, uid, ruid, tty, state, threads), as ps shows them."""


def ps_rows(uid: int) -> list[Row]:
    """Every process ps shows with effective ``uid``, states in the exporter's words."""
    out = subprocess.run(
        ["ps", "-e", "-o", "pid=,ppid=,uid=,ruid=,tty=,stat=,nlwp="],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rows = []
    for line in out.splitlines():
        pid, ppid, euid, ruid, tty, stat, nlwp = line.split()
        if int(euid) == uid:
            tty = "none" if tty == "?" else tty
            state = linux_state(stat[0])
            rows.append((int(pid), int(ppid), int(euid), int(ruid), tty, state, int(nlwp)))
    return rows


def ours(procs: list[subprocess.Popen[bytes]]) -> list[Row]:
    """ps rows of the test's processes and their children, once every one has settled."""
    pids = {p.pid for p in procs}

    def ready() -> list[Row] | None:
        rows = [r for r in ps_rows(NOBODY) if r[0] in pids or r[1] in pids]
        states = Counter(r[5] for r in rows)
        if (
            len(rows) == len(procs) + 1  # the zombie is the one child
            and states["stopped"] == 1
            and states["zombie"] == 1
            and any(r[6] == 5 for r in rows)
            and sum(r[4].startswith("pts/") for r in rows) == 1
            and set(states) == {"sleeping", "stopped", "zombie"}  # none still starting up
        ):
            return rows
        return None

    return wait_until(ready, timeout=20, what="test processes to settle")  # type: ignore[no-any-return]


def test_records_match_ps(nobody_procs: list[subprocess.Popen[bytes]]) -> None:
    rows = ours(nobody_procs)
    by_pid = {p.pid: p for p in ProcfsSource().procs()}
    for pid, ppid, uid, ruid, tty, state, threads in rows:
        p = by_pid[pid]
        assert (p.ppid, p.uid, p.ruid, p.tty, p.state, p.threads) == (
            ppid,
            uid,
            ruid,
            tty,
            state,
            threads,
        )
    assert {r[3] for r in rows} == {NOBODY, 65533}


def exported(metrics: dict[Any, float], name: str, user: str) -> Counter[tuple[str, str]]:
    """(tty, state) counts of ``user`` in the exposition, zero series left out."""
    out: Counter[tuple[str, str]] = Counter()
    for (metric, labels), value in metrics.items():
        labels = dict(labels)
        if metric == name and labels["user"] == user and value:
            out[labels["tty"], labels["state"]] += int(value)
    return out


def scrape_beside_ps(e: Any) -> tuple[dict[Any, float], list[Row]]:
    """A scrape and the ps rows of nobody that held both before and after it."""

    def stable() -> tuple[dict[Any, float], list[Row]] | None:
        before = sorted(ps_rows(NOBODY))
        metrics = e.metrics()
        return (metrics, before) if sorted(ps_rows(NOBODY)) == before else None

    return wait_until(stable, timeout=20, what="a scrape while nobody's processes hold still")  # type: ignore[no-any-return]


def test_exporter_counts_match_ps_and_drop_on_exit(
    nobody_procs: list[subprocess.Popen[bytes]], exporter: Any
) -> None:
    mine = ours(nobody_procs)
    # The setresuid process is not dumpable: the files in its /proc/PID belong to root, and
    # only the directory, which the poll's census reads, keeps its effective uid.
    seteuid = next(r[0] for r in mine if r[3] == 65533)
    assert os.stat(f"/proc/{seteuid}/stat").st_uid == 0
    assert os.stat(f"/proc/{seteuid}").st_uid == NOBODY
    e = exporter("interval: 0\n")
    metrics, rows = scrape_beside_ps(e)
    assert set(mine) <= set(rows)  # ours held still, as did every other nobody process
    assert exported(metrics, "kvm_processes", "nobody") == Counter((r[4], r[5]) for r in rows)
    threads: Counter[tuple[str, str]] = Counter()
    for r in rows:
        threads[r[4], r[5]] += r[6]
    assert exported(metrics, "kvm_threads", "nobody") == threads
    states = {dict(lb)["state"] for (n, lb) in metrics if n == "kvm_processes"}
    assert states == set(STATES)  # every state is there, zero or not

    for p in nobody_procs:
        p.kill()
        p.wait()
    wait_until(lambda: not set(mine) & set(ps_rows(NOBODY)), what="test processes to exit")
    metrics, rows = scrape_beside_ps(e)
    after = exported(metrics, "kvm_processes", "nobody")
    assert after == Counter((r[4], r[5]) for r in rows)
    pty = next(r[4] for r in mine if r[4].startswith("pts/"))
    assert after[pty, "sleeping"] == 0  # that terminal had only the test's process
