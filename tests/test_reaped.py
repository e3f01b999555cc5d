"""Reaped children's usage (kvm_exporter.usage.Tracker): what a process's children's usage grew
by goes to its account, less what was counted of those children already.

The kernels' rules the tests play out (Linux ``kernel/exit.c`` wait_task_zombie adds a reaped
child's times and faults, its own plus its children's, to the parent's ``cutime``/``cminflt``...;
FreeBSD ``kern_exit.c`` proc_reap does the same with ``ruadd`` into ``p_cru``, the
``ki_rusage_ch`` of a kinfo_proc); an orphan goes to the nearest subreaper ancestor, else init
(Linux ``forget_original_parent``/``find_new_reaper``, FreeBSD ``reaper_abandon_children`` and
``proc_reparent``).
"""

from __future__ import annotations

import random
import struct

from test_usage import BY_UID, CPU, Run, cpu, row

from kvm_exporter.records import UsageSpec
from kvm_exporter.states import LINUX_STATES
from kvm_exporter.usage import STARTED, Accounts, Resources, Tracker


def started(res: Resources) -> dict[str, float]:
    return {key[0]: value for key, value in res.counters[STARTED].items()}


def test_children_no_poll_saw_count_for_their_reaper() -> None:
    """A build: children that live less than an interval, each reaped by make."""
    run = Run()
    run.poll(row(10, 5, 0))
    assert cpu(run.poll(row(10, 5, 0, children=3000))) == {"u5": 30.0}
    assert cpu(run.poll(row(10, 5, 20, children=3500))) == {"u5": 35.2}


def test_a_child_seen_before_it_was_reaped_counts_once() -> None:
    """Seen mid-life with 10 s used before the exporter started (a baseline, never counted),
    then 5 s between polls, then 3 s before its exit: its reaper adds the 3 s only."""
    run = Run()
    run.poll(row(10, 5, 0), row(11, 5, 1000, ppid=10))
    assert cpu(run.poll(row(10, 5, 0), row(11, 5, 1500, ppid=10))) == {"u5": 5.0}
    assert cpu(run.poll(row(10, 5, 0, children=1800))) == {"u5": 8.0}


def test_a_child_of_another_user_gives_its_last_interval_to_the_reaper() -> None:
    """A cron job under root's cron: what the job used up to its last poll is its user's; its
    last interval (after that poll, to its exit) is in cron's reaped usage: root's."""
    run = Run()
    run.poll(row(10, 0, 0), row(11, 7, 100, ppid=10, start=100))
    assert cpu(run.poll(row(10, 0, 0), row(11, 7, 600, ppid=10))) == {"u0": 0.0, "u7": 5.0}
    res = run.poll(row(10, 0, 0, children=900))
    assert cpu(res) == {"u0": 3.0, "u7": 5.0} and res.processes == {("u0",): 1, ("u7",): 0}


def test_grandchildren_reaped_through_a_gone_parent_count_once() -> None:
    """A shell (seen) that ran a command (seen) and both exited within the interval: the
    shell reaped the command, make reaped the shell, so make's growth holds both."""
    run = Run()
    run.poll(row(10, 5, 0), row(20, 5, 100, ppid=10), row(30, 5, 200, ppid=20))
    run.poll(row(10, 5, 0), row(20, 5, 150, ppid=10), row(30, 5, 260, ppid=20))
    # shell's final 170 own + its child's final 300: make's children grow by 470.
    assert cpu(run.poll(row(10, 5, 0, children=470))) == {"u5": 1.7}


def test_an_orphan_reaped_by_init_counts_once_and_for_init() -> None:
    """The shell exits first (make reaps it), its command is given to init and init reaps
    it: make adds the shell's last 20 ticks, init the command's last 40."""
    run = Run()
    procs = [row(1, 0, 0, ppid=0), row(10, 5, 0), row(20, 6, 100, ppid=10)]
    run.poll(*procs, row(30, 7, 200, ppid=20))
    procs[2] = row(20, 6, 150, ppid=10)
    assert cpu(run.poll(*procs, row(30, 7, 260, ppid=20))) == {
        "u0": 0.0,
        "u5": 0.0,
        "u6": 0.5,
        "u7": 0.6,
    }
    res = run.poll(row(1, 0, 0, ppid=0, children=300), row(10, 5, 0, children=170))
    assert cpu(res) == {"u0": 0.4, "u5": 0.2, "u6": 0.5, "u7": 0.6}


def test_an_orphan_goes_to_a_subreaper_not_past_it() -> None:
    """As above with a subreaper (PR_SET_CHILD_SUBREAPER, PROC_REAP_ACQUIRE) between init and
    make: the command's last interval is the subreaper's, init's stays at 0."""
    run = Run()
    top = [row(1, 0, 0, ppid=0), row(5, 9, 0)]
    run.poll(*top, row(10, 5, 0, ppid=5), row(20, 5, 100, ppid=10), row(30, 5, 200, ppid=20))
    run.poll(*top, row(10, 5, 0, ppid=5), row(20, 5, 150, ppid=10), row(30, 5, 260, ppid=20))
    res = run.poll(top[0], row(5, 9, 0, children=300), row(10, 5, 0, ppid=5, children=170))
    assert cpu(res) == {"u0": 0.0, "u9": 0.4, "u5": 1.3}


def test_a_zombie_adds_nothing_and_its_reaper_adds_its_last_interval() -> None:
    """FreeBSD's exit1 adds a zombie's reaped children's usage into its own (kern_exit.c):
    a zombie's row must add nothing, or its children would count twice."""
    run = Run()
    run.poll(row(10, 5, 0), row(20, 6, 100, ppid=10))
    run.poll(row(10, 5, 0), row(20, 6, 150, ppid=10))
    # pid 20 ran a child no poll saw (400 ticks), reaped it, and exited: own 170 + 400.
    zombie = row(20, 6, 570, ppid=10, state="Z", children=400)
    assert cpu(run.poll(row(10, 5, 0), zombie)) == {"u5": 0.0, "u6": 0.5}
    assert cpu(run.poll(row(10, 5, 0), zombie)) == {"u5": 0.0, "u6": 0.5}
    assert cpu(run.poll(row(10, 5, 0, children=570))) == {"u5": 4.2, "u6": 0.5}


def test_a_zombie_first_seen_at_the_first_poll_is_a_baseline() -> None:
    """Its reaper's growth is all it used before the exporter started: nothing is added."""
    run = Run()
    run.poll(row(10, 5, 0), row(20, 5, 900, ppid=10, state="Z"))
    assert cpu(run.poll(row(10, 5, 0, children=900))) == {"u5": 0.0}


def test_a_zombie_holds_what_it_reaped_until_its_own_reaper_reaps_it() -> None:
    """A shell reaped its command (seen), then exited: while it is a zombie the command's
    counted ticks wait in it, and come off when make reaps the shell."""
    run = Run()
    run.poll(row(10, 5, 0), row(20, 5, 0, ppid=10), row(30, 5, 100, ppid=20))
    run.poll(row(10, 5, 0), row(20, 5, 10, ppid=10), row(30, 5, 300, ppid=20))
    zombie = row(20, 5, 20 + 350, ppid=10, state="Z", children=350)
    assert cpu(run.poll(row(10, 5, 0), zombie)) == {"u5": 2.1}
    assert cpu(run.poll(row(10, 5, 0, children=370))) == {"u5": 2.7}


def test_a_reused_pid_is_not_mistaken_for_the_reaped_child() -> None:
    """The child exits, its reaper reaps it and a new process of another user takes its pid
    within one interval."""
    run = Run()
    run.poll(row(10, 5, 0), row(11, 5, 100, ppid=10))
    run.poll(row(10, 5, 0), row(11, 5, 200, ppid=10))
    res = run.poll(row(10, 5, 0, children=230), row(11, 7, 50, ppid=1, start=1015))
    assert cpu(res) == {"u5": 1.3, "u7": 0.5}
    assert started(res) == {"u5": 0.0, "u7": 1.0}


def test_a_new_reaper_adds_all_its_children_used() -> None:
    run = Run()
    run.poll(row(10, 5, 0))
    assert cpu(run.poll(row(10, 5, 0), row(12, 5, 5, ppid=10, start=1005, children=70))) == {
        "u5": 0.75
    }


def test_a_reap_read_before_its_child_vanished_is_netted_at_the_next_poll() -> None:
    """The walk read make (children 0), then make reaped its child, which the walk then did
    not find: the child's ticks come off make's growth one poll later."""
    run = Run()
    run.poll(row(10, 5, 0), row(11, 5, 100, ppid=10))
    run.poll(row(10, 5, 0), row(11, 5, 200, ppid=10))
    assert cpu(run.poll(row(10, 5, 0))) == {"u5": 1.0}
    assert cpu(run.poll(row(10, 5, 0, children=230))) == {"u5": 1.3}


def test_processes_started_count_new_processes_after_the_first_poll() -> None:
    run = Run()
    assert started(run.poll(row(10, 5, 0), row(11, 6, 0))) == {"u5": 0.0, "u6": 0.0}
    res = run.poll(row(10, 5, 0), row(12, 5, 0, start=1005), row(13, 5, 0, start=1006))
    assert started(res) == {"u5": 2.0, "u6": 0.0}


class Host:
    """A process table as the kernel keeps it: usage, reaping and re-parenting, Linux's rules
    (a zombie's own usage does not include its children's)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.procs: dict[int, dict[str, int]] = {1: self.proc(0, 0, 0), 2: self.proc(1, 0, 0)}
        self.procs[2]["subreaper"] = 1
        self.used = 0
        """Ticks used since the first poll, by any process, seen or not."""

    @staticmethod
    def proc(ppid: int, uid: int, start: int) -> dict[str, int]:
        return {"ppid": ppid, "uid": uid, "start": start, "own": 0, "ch": 0, "zombie": 0}

    def step(self, clock: int, counting: bool) -> None:
        rng, procs = self.rng, self.procs
        for pid in rng.sample(sorted(procs), len(procs)):
            p = procs.get(pid)
            if p is None:
                continue
            if not p["zombie"]:
                ticks = rng.randrange(30)
                p["own"] += ticks
                self.used += ticks if counting else 0
            event = rng.random()
            if pid > 2 and not p["zombie"] and event < 0.15:
                self.exit(pid)
            elif not p["zombie"] and event < 0.45 and len(procs) < 60:
                free = [n for n in range(3, 120) if n not in procs]
                child = rng.choice(free)
                procs[child] = self.proc(pid, rng.randrange(4), clock)
            for zombie in [c for c, q in procs.items() if q["zombie"] and q["ppid"] == pid]:
                if pid <= 2 or rng.random() < 0.6:  # init and the subreaper reap at once
                    self.reap(zombie)

    def exit(self, pid: int) -> None:
        p = self.procs[pid]
        p["zombie"] = 1
        new_parent = p["ppid"]
        while new_parent not in (1, 2) and not self.procs[new_parent].get("subreaper"):
            new_parent = self.procs[new_parent]["ppid"]
        for q in self.procs.values():
            if q["ppid"] == pid:
                q["ppid"] = new_parent

    def reap(self, pid: int) -> None:
        p = self.procs.pop(pid)
        self.procs[p["ppid"]]["ch"] += p["own"] + p["ch"]

    def rows(self) -> list[bytes]:
        return [
            row(
                pid,
                p["uid"],
                p["own"],
                start=p["start"],
                ppid=p["ppid"],
                state="Z" if p["zombie"] else "S",
                children=p["ch"],
            )
            for pid, p in self.procs.items()
        ]


def test_a_random_process_tree_adds_up_to_what_it_used() -> None:
    """Forks, exits, orphans to init and to a subreaper, zombies, reaps and pid reuse, each
    poll seeing only some of the processes' lives: all series together grow by exactly what
    every process used since the first poll, once everything has been reaped."""
    for seed in range(20):
        rng = random.Random(seed)
        host, run = Host(rng), Run()
        for poll in range(40):
            for _ in range(rng.randrange(1, 4)):
                host.step(run.clock + 1, counting=poll > 0)
            run.poll(*host.rows())
        for pid in [pid for pid in host.procs if pid > 2]:
            host.exit(pid)
        while len(host.procs) > 2:
            for pid in [pid for pid, p in host.procs.items() if p["zombie"]]:
                if host.procs[pid]["ppid"] in host.procs:
                    host.reap(pid)
        res = run.poll(*host.rows())
        assert abs(sum(cpu(res).values()) - host.used * 0.01) < 1e-6, seed


BSD_ROW = struct.Struct("=10q16s6q")
"""FreeBSD's shape: user seconds and microseconds, and faults, then the same of reaped
children, of which the kernel fills only the times (fill_kinfo_proc_only's calccru)."""
BSD_SPEC = UsageSpec(
    page_size=4096,
    counters=(("cpu", "user", 1.0), ("cpu", "user", 1e-6), ("page_faults", "minor", 1.0)),
    decode=BSD_ROW.unpack,
    state=lambda code: LINUX_STATES[chr(code)],
    start_time=lambda start, _: float(start),
    reaped=frozenset({"cpu"}),
)


def bsd_row(pid: int, ppid: int, own: tuple[int, int, int], children: tuple[int, int]) -> bytes:
    fields = (pid, 100, 0, 5, 0, 1, 2, ppid, 1, ord("S"))
    return BSD_ROW.pack(*fields, b"t", *own, *children, 0)


def test_seconds_and_microseconds_are_netted_whole_and_unreported_counts_not_at_all() -> None:
    """The reaper's children's time goes from 1.9 s to 2.15 s (microseconds go down: no
    shortfall), of which the child it reaped had 0.2 s at its last poll; the child's 40 faults were
    counted as its own and the kernel reports no children's faults: nothing is taken off."""
    tracker = Tracker(BY_UID, BSD_SPEC)
    accounts = Accounts(("user",), 10, BSD_SPEC)

    def poll(clock: int, *rows: bytes) -> dict[tuple[str, str], float]:
        res = accounts.add(tracker.update(rows, clock), lambda g: (f"u{g[0]}",))
        return {column: round(v[("u5",)], 6) for column, v in res.counters.items()}

    poll(1000, bsd_row(10, 1, (0, 0, 0), (1, 900000)), bsd_row(11, 10, (0, 50000, 10), (0, 0)))
    got = poll(
        1010, bsd_row(10, 1, (0, 0, 0), (1, 900000)), bsd_row(11, 10, (0, 200000, 50), (0, 0))
    )
    assert got[CPU] == 0.15 and got["page_faults", "minor"] == 40
    got = poll(1020, bsd_row(10, 1, (0, 0, 0), (2, 150000)))
    assert got[CPU] == 0.15 + 0.05 and got["page_faults", "minor"] == 40
    assert tracker._owed == {}
