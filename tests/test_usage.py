"""Resource accounting (kvm_exporter.usage): the counter rules, on rows the test writes."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import copy_proc_fixture

from kvm_exporter.config import ConfigError, parse_config
from kvm_exporter.groups.rules import parse_process_names
from kvm_exporter.poller import Poller, Settings
from kvm_exporter.records import USAGE_STATE, UsageSpec
from kvm_exporter.sources import procfs
from kvm_exporter.sources.procfs import ProcfsSource
from kvm_exporter.states import LINUX_STATES
from kvm_exporter.usage import IDLE_KEPT, Accounts, Attribution, Resources, Tracker, accounting_for

ROW = struct.Struct("=10q16s4q")
"""Usage records as the tests write them: two counters, then the same of reaped children."""
SPEC = UsageSpec(
    page_size=4096,
    counters=(("cpu", "user", 0.01), ("page_faults", "minor", 1.0)),
    decode=ROW.unpack,
    state=lambda code: LINUX_STATES[chr(code)],
    start_time=lambda start, _: float(start),
)
BY_UID = Attribution(lambda row, _: (row[3],))
CPU = ("cpu", "user")
T = TypeVar("T")


def row(
    pid: int,
    uid: int,
    ticks: int,
    faults: int = 0,
    start: int = 100,
    rss: int = 1,
    ppid: int = 1,
    state: str = "S",
    children: int = 0,
) -> bytes:
    """A usage record: pid, start, fraction, uid, jid, rss pages, vsize, ppid, one thread,
    state, comm t, user ticks, faults, reaped children's user ticks, no children's faults."""
    fields = (pid, start, 0, uid, 0, rss, rss * 2, ppid, 1, ord(state))
    return ROW.pack(*fields, b"t", ticks, faults, children, 0)


class Run:
    """A tracker and accounts polled in turn, as the poller does."""

    def __init__(self, max_accounts: int = 100, attribution: Attribution = BY_UID) -> None:
        self.tracker = Tracker(attribution, SPEC)
        self.accounts = Accounts(("user",), max_accounts, SPEC)
        self.clock = 1000

    def poll(self, *rows: Any) -> Resources:
        return self.update(rows)

    def update(self, records: Sequence[bytes]) -> Resources:
        tally = self.tracker.update(records, self.clock)
        self.clock += 10
        return self.accounts.add(tally, lambda account: (f"u{account[0]}",))


def cpu(res: Resources) -> dict[str, float]:
    return {key[0]: round(v, 6) for key, v in res.counters[CPU].items()}


def test_first_poll_is_the_baseline_then_only_growth_counts() -> None:
    run = Run()
    assert cpu(run.poll(row(1, 0, 5000), row(2, 7, 100))) == {"u0": 0.0, "u7": 0.0}
    assert cpu(run.poll(row(1, 0, 5100), row(2, 7, 100))) == {"u0": 1.0, "u7": 0.0}
    res = run.poll(row(1, 0, 5150, faults=3), row(2, 7, 130))
    assert cpu(res) == {"u0": 1.5, "u7": 0.3}
    assert res.counters["page_faults", "minor"] == {("u0",): 3.0, ("u7",): 0.0}


def test_gauges_are_the_sums_of_live_processes() -> None:
    run = Run()
    run.poll(row(1, 0, 0, rss=10), row(2, 0, 0, rss=5), row(3, 7, 0, rss=1))
    res = run.poll(row(1, 0, 0, rss=12), row(3, 7, 0, rss=1))
    assert res.processes == {("u0",): 1, ("u7",): 1}
    assert res.resident_bytes == {("u0",): 12 * 4096, ("u7",): 4096}
    assert res.virtual_bytes == {("u0",): 24, ("u7",): 2}


def test_a_process_seen_mid_life_adds_nothing_one_born_since_the_last_poll_adds_all() -> None:
    run = Run()
    run.poll(row(1, 0, 0))
    # pid 2 started (start 500) before the previous poll's clock (1000): mid-life, baseline.
    # pid 3 started at 1005, after that poll read: all it used is new.
    res = run.poll(row(1, 0, 0), row(2, 7, 9000, start=500), row(3, 8, 40, start=1005))
    assert cpu(res) == {"u0": 0.0, "u7": 0.0, "u8": 0.4}


def test_pid_reuse_is_a_new_process_not_a_drop() -> None:
    run = Run()
    run.poll(row(1, 0, 0))
    run.poll(row(1, 0, 800))
    # The same pid, another start time, fewer ticks: a new process, seen mid-life.
    res = run.poll(row(1, 0, 10, start=200))
    assert cpu(res) == {"u0": 8.0}
    assert cpu(run.poll(row(1, 0, 60, start=200))) == {"u0": 8.5}


def test_a_uid_change_moves_future_growth_and_the_old_account_keeps_its_total() -> None:
    run = Run()
    run.poll(row(1, 0, 0), row(2, 7, 0))
    run.poll(row(1, 0, 100), row(2, 7, 0))
    res = run.poll(row(1, 7, 300), row(2, 7, 0))  # pid 1 became uid 7 and used 2 s more
    assert cpu(res) == {"u0": 1.0, "u7": 2.0}  # u0 has no process left: served at its total
    assert res.processes == {("u0",): 0, ("u7",): 2}
    res = run.poll(row(1, 7, 300), row(2, 7, 0), row(5, 0, 0, start=1015))
    assert cpu(res) == {"u0": 1.0, "u7": 2.0} and res.processes[("u0",)] == 1


def test_vanished_processes_are_forgotten() -> None:
    run = Run()
    run.poll(*(row(pid, 0, 0) for pid in range(1000)))
    assert len(run.tracker) == 1000
    res = run.poll(row(5, 0, 0))
    assert len(run.tracker) == 1 and res.processes == {("u0",): 1}


def test_attach_runs_once_per_process() -> None:
    asked: list[int] = []

    def attach(new: dict[int, bytes], _: Any) -> dict[int, str]:
        asked.extend(new)
        return {pid: f"slice{pid % 2}" for pid in new}

    run = Run(attribution=Attribution(lambda r, attached: (attached,), attach))
    run.poll(row(1, 0, 0), row(2, 0, 0))
    res = run.poll(row(1, 0, 10), row(2, 0, 20))
    assert sorted(asked) == [1, 2] and cpu(res) == {"uslice1": 0.1, "uslice0": 0.2}
    run.poll(row(1, 0, 10), row(2, 0, 0, start=300))
    assert sorted(asked) == [1, 2, 2]  # a reused pid is asked again


def test_an_account_folding_into_other_adds_only_its_growth_there() -> None:
    run = Run(max_accounts=2)  # one own series and other
    run.poll(row(1, 0, 0), row(2, 0, 0), row(3, 7, 0), row(4, 8, 0))
    res = run.poll(row(1, 0, 100), row(2, 0, 0), row(3, 7, 50), row(4, 8, 0))
    assert cpu(res) == {"u0": 1.0, "other": 0.5} and res.folded == 2
    # u7 outgrows u0: u0 folds, other gets only u0's growth since the last poll, and u7's
    # own series starts at 0 (its growth so far went to other).
    rows = [row(1, 0, 100), row(3, 7, 50), row(4, 8, 0)]
    rows += [row(10 + i, 7, 0, start=1) for i in range(3)]
    assert cpu(run.poll(*rows)) == {"u7": 0.0, "other": 0.5}
    rows[0] = row(1, 0, 200)
    assert cpu(run.poll(*rows)) == {"u7": 0.0, "other": 1.5}


def test_idle_series_totals_are_bounded() -> None:
    run = Run(max_accounts=3)
    for uid in range(100):
        run.poll(row(uid, uid, 0))
        run.poll(row(uid, uid, 10))
    assert len(run.accounts._totals) == IDLE_KEPT * 3 + 1


def test_churn_never_lowers_a_counter_and_the_sum_is_what_was_used() -> None:
    """Random pid reuse, uid changes, exits and births under a cap that folds: every series
    only grows, and all series together grew by exactly what the tracked processes used."""
    rng = random.Random(13)
    run = Run(max_accounts=3)
    procs: dict[int, list[int]] = {}  # pid: [start, uid, ticks]
    last: dict[str, float] = {}
    used = 0  # ticks the rules say must be counted
    mid_life = 0
    for poll in range(300):
        counted: dict[int, int] = {}  # what each pid added to used this round
        for pid in list(procs):
            p = procs[pid]
            event = rng.random()
            if event < 0.1:
                del procs[pid]  # exits: what it used since the last poll is lost
                continue
            if event < 0.2:
                p[1] = rng.randrange(6)  # setuid
            counted[pid] = rng.randrange(50)
            p[2] += counted[pid]
            used += counted[pid]
        for _ in range(rng.randrange(4)):
            pid = rng.randrange(40)  # a small pid space: reuse
            used -= counted.pop(pid, 0)  # the process that had this pid exited
            if poll > 0 and rng.random() < 0.5:  # born since the last poll: all of it counts
                ticks = rng.randrange(100)
                procs[pid] = [run.clock, rng.randrange(6), ticks]
                counted[pid] = ticks
                used += ticks
            else:  # first seen mid-life: its past is a baseline
                mid_life += 1
                procs[pid] = [-mid_life, rng.randrange(6), rng.randrange(10**6)]
        res = run.poll(*(row(pid, p[1], p[2], start=p[0]) for pid, p in procs.items()))
        now = cpu(res)
        for key, value in now.items():
            assert value >= last.get(key, 0.0), (key, value, last.get(key))
        last.update(now)
        assert len(res.processes) <= 3
    totals = sum(t.get(CPU, 0.0) for t in run.accounts._totals.values())
    assert abs(totals - used * 0.01) < 1e-6


def test_compiled_and_python_surveys_read_the_same_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = ProcfsSource(str(copy_proc_fixture(tmp_path / "proc")))
    assert procfs._lib is not None, "the README's test command builds kvm_exporter/_procscan"
    compiled = source.survey()
    monkeypatch.setattr(procfs, "_lib", None)
    python = source.survey()
    assert compiled.census == python.census
    assert sorted(compiled.usage) == sorted(python.usage)
    # 1 (init) S 0 ... minflt 100 ... utime 250 stime 150 ... num_threads 1 ... starttime 12345
    # vsize 10485760 rss 512, in a directory owned by root
    init = next(r for r in map(source.usage_spec.decode, compiled.usage) if r[0] == 1)
    comm = b"init".ljust(64, b"\0")
    own, children = (250, 150, 100, 0), (40, 20, 7, 3)  # cutime cstime cminflt cmajflt
    assert init == (1, 12345, 0, 0, 0, 512, 10485760, 0, 1, ord("S"), comm, *own, *children)
    assert source.usage_spec.state(init[USAGE_STATE]) == "sleeping"


def test_resource_labels_are_checked() -> None:
    assert parse_config("resources: {labels: [jail, user]}").resources.labels == ("jail", "user")
    assert parse_config("labels: [user, jail]").labels == ("user", "jail")
    with pytest.raises(ConfigError, match=r"resources.labels: got \['state'\], expected a list"):
        parse_config("resources: {labels: [state]}")


def test_an_accounting_lasts_while_source_and_settings_do(tmp_path: Path) -> None:
    source = ProcfsSource(str(copy_proc_fixture(tmp_path / "proc")))
    first = accounting_for(None, source, ("user",), 1000)
    assert first is not None and accounting_for(first, source, ("user",), 1000) is first
    assert accounting_for(first, source, ("user", "jail"), 1000) not in (None, first)
    assert accounting_for(first, source, ("user",), 500) not in (None, first)
    assert accounting_for(first, source, None, 1000) is None  # resources.enabled: false


class Walks(ProcfsSource):
    """A procfs source that counts its walks of the process table (each opens the root)."""

    walks = 0

    def _in_proc_dir(self, scan: Callable[[int], T]) -> T:
        self.walks += 1
        return super()._in_proc_dir(scan)


@pytest.mark.parametrize("compiled", [True, False])
def test_a_poll_with_groups_and_resources_walks_the_process_table_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compiled: bool
) -> None:
    if not compiled:
        monkeypatch.setattr(procfs, "_lib", None)
    source = Walks(str(copy_proc_fixture(tmp_path / "proc")))
    rules = parse_process_names([{"name": "{{.Comm}}", "comm": ["sshd", "bash"]}])
    poller = Poller(source, Settings(groups=rules))
    for polls in (1, 2):
        snap = poller.poll()
        assert source.walks == polls
        assert snap.success["procs"] and snap.success["groups"]
        assert snap.groups is not None and snap.groups.processes["sshd"] == 1
        assert snap.resources is not None and snap.resources.processes


def test_the_shared_kinds_of_gone_processes_are_let_go() -> None:
    """Each poll a process of a uid never seen before replaces the last: the tracker's table
    of the kinds processes share stays bounded by the kinds alive, and each process keeps its
    own kind."""
    run = Run()
    for uid in range(1000):
        res = run.poll(row(1, 0, 0), row(2 + uid, uid + 1, 0))
        live = {key: n for key, n in res.processes.items() if n}  # the gone stay at 0
        assert live == {("u0",): 1, (f"u{uid + 1}",): 1}
    assert len(run.tracker._shared) <= 2 * 2 + 64


def test_a_poll_that_fails_half_way_leaves_the_next_one_working() -> None:
    """An error inside an update (here the attribution's, for a new process) fails that poll
    only: the next starts afresh, as a baseline, and no series goes down."""
    failing = [True]

    def attach(new: dict[int, bytes], _: Any) -> dict[int, None]:
        if 3 in new and failing:
            failing.clear()
            raise RuntimeError("unforeseen")
        return dict.fromkeys(new)

    run = Run(attribution=Attribution(lambda r, _: (r[3],), attach))
    run.poll(row(1, 0, 0), row(2, 0, 0))
    assert cpu(run.poll(row(1, 0, 100), row(2, 0, 0))) == {"u0": 1.0}
    with pytest.raises(RuntimeError):
        run.poll(row(1, 0, 200), row(3, 0, 0))
    res = run.poll(row(1, 0, 300), row(3, 0, 0))
    assert res.processes == {("u0",): 2} and cpu(res) == {"u0": 1.0}
    assert cpu(run.poll(row(1, 0, 350), row(3, 0, 0))) == {"u0": 1.5}


def test_gone_accounts_stay_while_the_cap_has_room_the_longest_idle_first_out() -> None:
    """Accounts whose processes are gone are served at 0, counters kept, in the room the live
    ones leave: the most recently live first; a live account never folds to make room."""
    run = Run(max_accounts=3)
    run.poll(row(1, 1, 0), row(2, 2, 0), row(3, 3, 0))
    run.poll(row(1, 1, 100), row(2, 2, 200), row(3, 3, 300))
    res = run.poll(row(1, 1, 100), row(2, 2, 200))  # u3 gone
    assert res.processes == {("u1",): 1, ("u2",): 1, ("u3",): 0} and cpu(res)["u3"] == 3.0
    res = run.poll(row(1, 1, 100))  # u2 gone too: both fit
    assert res.processes == {("u1",): 1, ("u2",): 0, ("u3",): 0}
    res = run.poll(row(1, 1, 100), row(4, 4, 0, start=1025))  # a new live account: u3 goes
    assert res.processes == {("u1",): 1, ("u4",): 1, ("u2",): 0} and res.folded == 0
    res = run.poll(row(1, 1, 100), row(4, 4, 0), row(5, 5, 0), row(6, 6, 0))
    assert res.processes == {("u1",): 1, ("u4",): 1, ("other",): 2} and res.folded == 2
    res = run.poll(row(1, 1, 100), row(3, 3, 0, start=1045))  # u3 back: its total goes on
    assert cpu(res)["u3"] == 3.0 and res.processes[("u3",)] == 1
