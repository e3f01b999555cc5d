"""Named process groups: each process named once, then processes counted per group.

A process (pid and start time) is named the first poll it is seen, from the rules of
``groups.py``; its arguments are read then, and only if a rule needs them, never again. With
``children`` (process-exporter's ``-children``), a new process no rule names joins the group of
its nearest ancestor that has one, as process-exporter's tracker does; a process whose parent
is gone or unnamed stays out. Processes no rule names are not counted, as in process-exporter.
Past ``max_series``, the smallest groups fold into ``other``: group names may come from
``{{.Matches.X}}``, which the processes' own arguments fill, and must not grow the series
count without bound.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from .aggregate import OTHER
from .groups import Argv, Rule, name_of
from .records import USAGE_PID, Proc, Survey, UsageSpec
from .states import STATES
from .usage import Accounts, Grouping, Tracker

ProcKey = tuple[int, float | None]
"""(pid, start time): one process, whatever later reuses its pid."""


class GroupCounts(NamedTuple):
    """One poll's processes per group (only groups with processes)."""

    processes: dict[str, int]
    threads: dict[str, int]
    states: dict[tuple[str, ...], int]
    """Processes per (group, state)."""
    resident_bytes: dict[str, int]
    virtual_bytes: dict[str, int]
    oldest_start: dict[str, float]
    """Start time of each group's oldest process (seconds since the epoch), where known."""
    folded: int
    """Groups folded into ``other`` to stay under max_series."""
    unreadable: int
    """Processes, since the exporter started, whose arguments a rule needed and no read gave
    (named as if they had none: ExeBase is their comm)."""
    counters: dict[tuple[str, str], dict[str, float]] = {}
    """Per (metric, label value) of the source's usage counters (``cpu``/``user``...), each
    group's total since the exporter started; empty where the source has no usage."""


class Grouper:
    """Names processes and counts them per group; holds the names between polls."""

    def __init__(
        self,
        rules: tuple[Rule, ...],
        children: bool,
        max_series: int,
        argv: Callable[[int], tuple[str, ...] | None],
        user_name: Callable[[int], str],
    ) -> None:
        self._rules = rules
        self._children = children
        self._max_series = max_series
        self._argv = argv
        self._user_name = user_name
        self._names: dict[ProcKey, str | None] = {}
        self._unreadable = 0
        self.group_of: dict[ProcKey, str] = {}
        """The group (after folding) of each process of the last poll that has one."""

    def update(self, procs: list[Proc]) -> GroupCounts:
        """Name the processes not seen before, forget those gone, count per group."""
        by_pid = {p.pid: p for p in procs}
        names: dict[ProcKey, str | None] = {}
        for proc in procs:
            self._decide(proc, by_pid, names)
        self._names = names  # processes gone are forgotten: pid reuse starts afresh
        group = {key: name for key, name in names.items() if name is not None}
        counts = _count(procs, group)
        kept = _kept(counts, self._max_series)
        if kept is not None:
            group = {key: name if name in kept else OTHER for key, name in group.items()}
            folded = len(counts.processes) - len(kept)
            counts = _count(procs, group)._replace(folded=folded)
        self.group_of = group
        return counts._replace(unreadable=self._unreadable)

    def _decide(
        self, proc: Proc, by_pid: dict[int, Proc], names: dict[ProcKey, str | None]
    ) -> None:
        """Name ``proc``, and the new ancestors its name depends on, into ``names``."""
        chain: dict[ProcKey, None] = {}  # new processes no rule names, each the child of the
        # next (a dict: a long chain, a hostile one, must not cost its square)
        current: Proc | None = proc
        name: str | None = None
        while current is not None:
            key = (current.pid, current.start_time)
            if key in names:
                name = names[key]
                break
            if key in self._names:
                name = names[key] = self._names[key]
                break
            name = self._name(current)
            if name is not None or not self._children:
                names[key] = name
                break
            chain[key] = None
            parent = by_pid.get(current.ppid)
            visited = parent is not None and (parent.pid, parent.start_time) in chain
            current = None if parent is None or parent.pid < 1 or visited else parent
        for key in chain:
            names[key] = name

    def _name(self, proc: Proc) -> str | None:
        def argv() -> tuple[str, ...] | None:
            return self._argv(proc.pid)

        name, unreadable = name_of(self._rules, Argv(proc.comm, self._user_name(proc.uid), argv))
        self._unreadable += unreadable
        return name


class GroupUsage:
    """The named groups' counters, kept by ``usage.py``'s rules: increments per process (pid
    and start time), totals per series that never go down through exits, pid reuse or a
    group folding into ``other``."""

    def __init__(self, spec: UsageSpec, max_series: int) -> None:
        self._group_of_pid: dict[int, str] = {}
        self._tracker = Tracker(
            Grouping(lambda row, _: self._group_of_pid.get(row[USAGE_PID])), spec.decode
        )
        self._accounts = Accounts(("group",), max_series, spec)

    def update(
        self, survey: Survey, group_of_pid: dict[int, str]
    ) -> dict[tuple[str, str], dict[str, float]]:
        """Each group's counter totals after this poll's usage read; ``group_of_pid`` is the
        group of each grouped process (the rest count nowhere)."""
        self._group_of_pid = group_of_pid
        tally = self._tracker.update(survey.usage, survey.clock)
        grouped = tally._replace(
            gauges={g: v for g, v in tally.gauges.items() if g is not None},
            increments={g: v for g, v in tally.increments.items() if g is not None},
        )
        totals = self._accounts.add(grouped, lambda group: (str(group),)).counters
        return {
            column: {key[0]: total for key, total in series.items()}
            for column, series in totals.items()
        }


def _count(procs: list[Proc], group: dict[ProcKey, str]) -> GroupCounts:
    processes: dict[str, int] = {}
    threads: dict[str, int] = {}
    states: dict[tuple[str, ...], int] = {}
    resident: dict[str, int] = {}
    virtual: dict[str, int] = {}
    oldest: dict[str, float] = {}
    for p in procs:
        name = group.get((p.pid, p.start_time))
        if name is None:
            continue
        processes[name] = processes.get(name, 0) + 1
        threads[name] = threads.get(name, 0) + max(p.threads, 1)
        states[name, p.state] = states.get((name, p.state), 0) + 1
        resident[name] = resident.get(name, 0) + p.rss_bytes
        virtual[name] = virtual.get(name, 0) + p.vsize_bytes
        if p.start_time is not None and p.start_time < oldest.get(name, float("inf")):
            oldest[name] = p.start_time
    return GroupCounts(processes, threads, states, resident, virtual, oldest, 0, 0)


def _kept(counts: GroupCounts, max_series: int) -> set[str] | None:
    """The groups that keep their name so no metric has more than ``max_series`` series (the
    most processes first, name breaking ties), or None if all fit. ``other`` takes one series,
    and one per state in the per-state metric."""
    if len(counts.processes) <= max_series and len(counts.states) <= max_series:
        return None
    state_count: dict[str, int] = {}
    for name, _ in counts.states:
        state_count[name] = state_count.get(name, 0) + 1
    kept: set[str] = set()
    room = max_series - len(STATES)
    for name in sorted(counts.processes, key=lambda g: (-counts.processes[g], g)):
        room -= state_count[name]
        if room < 0 or len(kept) + 1 >= max_series:
            break
        kept.add(name)
    return kept
