"""Aggregation: pure counts from records, zero-filled states, the cardinality cap."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from conftest import PROC_FIXTURE, wait_until

from kvm_exporter.aggregate import MIN_SERIES, OTHER, aggregate, user_names
from kvm_exporter.records import Proc, census_of
from kvm_exporter.states import DUMP_STATES, STATES

LABELS = ("user", "tty", "state")


def proc(pid: int, uid: int = 0, tty: str = "none", state: str = "sleeping", threads: int = 1):
    return Proc(pid, 1, uid, uid, tty, state, "x", threads, 0, 0, 0.0, 0.0)


def names(uid: int) -> str:
    return {0: "root", 65534: "nobody"}.get(uid, str(uid))


def test_counts_per_group_and_threads() -> None:
    procs = [proc(1), proc(2, threads=3), proc(3, 65534, "pts/1", "zombie"), proc(4, 7)]
    c = aggregate(census_of(procs), LABELS, 1000, names)
    assert c.processes[("root", "none", "sleeping")] == 2
    assert c.threads[("root", "none", "sleeping")] == 4
    assert c.processes[("nobody", "pts/1", "zombie")] == 1
    assert c.processes[("7", "none", "sleeping")] == 1
    assert c.folded == 0


def test_every_state_present_with_zeros() -> None:
    c = aggregate(census_of([proc(1)]), LABELS, 1000, names)
    states = {key[2] for key in c.processes}
    assert states == set(STATES)
    assert c.processes[(OTHER, OTHER, "zombie")] == 0
    assert c.threads[(OTHER, OTHER, "zombie")] == 0
    assert len(c.processes) == len(STATES)


def test_only_the_states_a_source_tells_apart_are_zero_filled() -> None:
    c = aggregate(census_of([proc(1)]), LABELS, 1000, names, DUMP_STATES)
    assert {key[2] for key in c.processes} == set(DUMP_STATES)
    assert "uninterruptible" not in DUMP_STATES and "idle" not in DUMP_STATES


def test_label_subsets() -> None:
    procs = [proc(1, tty="pts/1"), proc(2, 65534, tty="pts/1"), proc(3, state="zombie")]
    c = aggregate(census_of(procs), ("tty",), 1000, names)
    assert c.processes == {("pts/1",): 2, ("none",): 1}
    c = aggregate(census_of(procs), ("state", "user"), 1000, names)
    assert c.processes[("sleeping", "root")] == 1
    assert c.processes[("zombie", "root")] == 1
    assert c.processes[("stopped", OTHER)] == 0
    c = aggregate(census_of(procs), (), 1000, names)
    assert c.processes == {(): 3}


def test_cap_folds_smallest_groups_and_conserves_totals() -> None:
    # 200 users with one process each, and one big group of 50.
    procs = [proc(i, uid=1000 + i) for i in range(200)]
    procs += [proc(1000 + i, uid=0, threads=2) for i in range(50)]
    cap = 30
    c = aggregate(census_of(procs), LABELS, cap, names)
    assert len(c.processes) <= cap
    assert c.processes[("root", "none", "sleeping")] == 50  # the biggest group survives
    assert sum(c.processes.values()) == 250
    assert sum(c.threads.values()) == 300
    assert c.folded == 201 - (cap - len(STATES))
    assert c.processes[(OTHER, OTHER, "sleeping")] == 200 - (cap - len(STATES) - 1)


def test_cap_without_state_label() -> None:
    procs = [proc(i, uid=1000 + i) for i in range(100)]
    c = aggregate(census_of(procs), ("user",), MIN_SERIES, names)
    assert len(c.processes) == MIN_SERIES
    assert sum(c.processes.values()) == 100
    assert c.processes[(OTHER,)] == 100 - (MIN_SERIES - 1)


def test_cap_counts_zero_filled_states() -> None:
    # Exactly MIN_SERIES real groups in one state: with the other states' zeros that is
    # too many, so some fold.
    procs = [proc(i, uid=1000 + i) for i in range(MIN_SERIES)]
    c = aggregate(census_of(procs), LABELS, MIN_SERIES, names)
    assert len(c.processes) <= MIN_SERIES
    assert {key[2] for key in c.processes} == set(STATES)


def test_user_names_from_password_database() -> None:
    name = user_names()
    assert name(0) == "root"
    assert name(65534) == "nobody"
    assert name(2**31 - 7) == str(2**31 - 7)


HOSTILE = 4242
"""A user who opened 1,500 pseudo-terminals, one process on each."""
SMALL = {1001: 3, 1002: 2, 1003: 7, 1004: 1, 1005: 4}
"""Small users: uid -> processes, each on its own tty, one of them running."""


def hostile_host() -> list[Proc]:
    procs = [proc(10_000 + i, HOSTILE, f"pts/{i}") for i in range(1500)]
    pid = 20_000
    for uid, count in SMALL.items():
        for i in range(count):
            pid += 1
            procs.append(proc(pid, uid, f"pts/{2000 + pid}", "running" if i == 0 else "sleeping"))
    return procs


def per_user(counts: Mapping[tuple[str, ...], float]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for (user, _tty, _state), n in counts.items():
        totals[user] = totals.get(user, 0) + n
    return totals


def test_a_user_with_many_ttys_loses_the_tty_detail_not_the_others_their_totals() -> None:
    procs = hostile_host()
    c = aggregate(census_of(procs), LABELS, 1000, names)
    assert len(c.processes) <= 1000
    assert c.processes[(str(HOSTILE), OTHER, "sleeping")] == 1500
    totals = per_user(c.processes)
    for uid, count in SMALL.items():
        assert totals[str(uid)] == count, uid
    # The small users keep even their ttys and states: only the hostile user was folded.
    untouched = {k: n for k, n in c.processes.items() if k[0] != str(HOSTILE) and n}
    assert untouched == {(str(p.uid), p.tty, p.state): 1 for p in procs if p.uid != HOSTILE}
    assert c.folded == 1500
    assert sum(c.processes.values()) == len(procs)
    assert sum(c.threads.values()) == len(procs)


def test_the_users_with_most_groups_lose_their_ttys_first() -> None:
    # Two users with many ttys: folding the bigger one is enough, the other keeps its ttys.
    procs = [proc(i, 500, f"pts/{i}") for i in range(60)]
    procs += [proc(100 + i, 501, f"pts/{100 + i}") for i in range(20)]
    procs += [proc(200, 502, "pts/200")]
    c = aggregate(census_of(procs), LABELS, 40, names)
    assert len(c.processes) <= 40
    assert c.processes[("500", OTHER, "sleeping")] == 60
    assert all(c.processes[("501", f"pts/{100 + i}", "sleeping")] == 1 for i in range(20))
    assert c.processes[("502", "pts/200", "sleeping")] == 1
    assert c.folded == 60


def test_users_fold_only_when_their_totals_exceed_the_cap() -> None:
    # 40 users in two states each (80 groups, no tty to fold): with room for 30 groups
    # (43 - 13 states), the 15 biggest users stay whole, the rest fold per state.
    procs: list[Proc] = []
    for u in range(40):
        procs += [proc(1000 * u + i, 5000 + u) for i in range(u + 2)]
        procs.append(proc(1000 * u + 999, 5000 + u, state="running"))
    c = aggregate(census_of(procs), LABELS, 43, names)
    assert len(c.processes) <= 43
    totals = per_user(c.processes)
    kept = {str(5000 + u) for u in range(25, 40)}
    assert {user for user in totals if user != OTHER} == kept
    for u in range(25, 40):
        assert totals[str(5000 + u)] == u + 3  # whole: both of its states
    assert totals[OTHER] == sum(u + 3 for u in range(25))
    assert c.processes[(OTHER, OTHER, "running")] == 25
    assert sum(c.processes.values()) == len(procs)
    assert c.folded == 50


def test_user_and_tty_labels_without_state() -> None:
    procs = hostile_host()
    c = aggregate(census_of(procs), ("user", "tty"), 20, names)
    assert len(c.processes) <= 20
    assert c.processes[(str(HOSTILE), OTHER)] == 1500
    for uid, count in SMALL.items():
        assert sum(n for (user, _), n in c.processes.items() if user == str(uid)) == count
    assert sum(c.processes.values()) == len(procs)


def proc_root(root: Path, procs: list[Proc]) -> Path:
    """A /proc tree with ``procs`` only (pseudo-terminals and states), owned like the kernel's."""
    root.mkdir()
    for name in ("loadavg", "stat", "swaps", "sys"):
        copy = shutil.copytree if name == "sys" else shutil.copyfile
        copy(PROC_FIXTURE / name, root / name)
    letter = {"sleeping": "S", "running": "R"}
    for p in procs:
        n = int(p.tty.removeprefix("pts/"))
        tty_nr = ((136 + n // 256) << 8) | (n % 256)  # Unix98 ptys span majors 136-143
        (root / str(p.pid)).mkdir()
        (root / str(p.pid) / "stat").write_text(
            f"{p.pid} (sh) {letter[p.state]} 1 {p.pid} {p.pid} {tty_nr} -1 4194560 0 0 0 0"
            " 0 0 0 0 20 0 1 0 100 1000 10\n"
        )
        os.chown(root / str(p.pid), p.uid, -1)
    return root


def test_a_real_exporter_keeps_every_small_users_total(exporter: Any, tmp_path: Path) -> None:
    procs = hostile_host()
    root = proc_root(tmp_path / "proc", procs)
    e = exporter(f"procfs: {{root: {root}}}\nmax_series: 1000\n")
    metrics = wait_until(lambda: (m := e.metrics()).get(("kvm_up", frozenset())) == 1 and m)
    series = {
        tuple(dict(labels)[k] for k in LABELS): value
        for (name, labels), value in metrics.items()
        if name == "kvm_processes"
    }
    assert len(series) <= 1000
    name = user_names()
    totals = per_user(series)
    for uid, count in SMALL.items():
        assert totals[name(uid)] == count, uid
    assert series[(name(HOSTILE), OTHER, "sleeping")] == 1500
    assert sum(series.values()) == len(procs)
    assert metrics[("kvm_processes_folded_groups", frozenset())] == 1500
