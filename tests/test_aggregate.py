"""Aggregation: pure counts from records, zero-filled states, the cardinality cap."""

from __future__ import annotations

from kvm_exporter.aggregate import MIN_SERIES, OTHER, aggregate, user_names
from kvm_exporter.records import Proc, census_of
from kvm_exporter.states import STATES

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
