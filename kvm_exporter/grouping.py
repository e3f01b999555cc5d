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

from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple, cast

from .aggregate import OTHER
from .groups import Argv, Rule, name_of
from .records import (
    USAGE_COMM,
    USAGE_PID,
    USAGE_PPID,
    USAGE_START,
    USAGE_START_FRACTION,
    USAGE_STATE,
    USAGE_UID,
    Survey,
    UsageRow,
    UsageSpec,
    comm_of,
)
from .states import STATES
from .usage import STARTED, Accounts, Grouping, GroupKey, Tally, Tracker


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
    """Per (metric, label value) of the source's usage counters (``cpu``/``user``...) and
    :data:`~kvm_exporter.usage.STARTED`, each group's total since the exporter started."""


class Grouper:
    """Names processes and counts them per group, from a survey's usage records: a
    :class:`~kvm_exporter.usage.Tracker` whose groups are (name, state), so a poll costs only
    the records that changed since the last; holds the names between polls."""

    def __init__(
        self,
        rules: tuple[Rule, ...],
        children: bool,
        max_series: int,
        argv: Callable[[int], tuple[str, ...] | None],
        user_name: Callable[[int], str],
        spec: UsageSpec,
        series_per_group: int = 1,
        cgroups: Callable[[int], tuple[str, ...]] | None = None,
    ) -> None:
        """``series_per_group``: what a group has in the metrics served besides ours (with
        process-exporter's names, one per state it knows, every group); ``cgroups``: the
        source's reader of a process's cgroup paths, for ``{{.Cgroups}}`` (none: no cgroups)."""
        self._cgroups = cgroups or _no_cgroups
        self._rules = rules
        self._children = children
        self._max_series = max_series
        self._argv = argv
        self._user_name = user_name
        self._spec = spec
        self._unreadable = 0
        self._tracker = Tracker(Grouping(self._key, self._names), spec, oldest=True)
        columns = dict.fromkeys((metric, value) for metric, value, _ in spec.counters)
        self._values = max([*Counter(metric for metric, _ in columns).values(), series_per_group])
        """Most series a group has in one metric but the per-state one: a counter's label
        values (cpu: user and system), or ``series_per_group``."""
        self._accounts = Accounts(("group",), max_series // self._values, spec)

    def update(self, survey: Survey) -> GroupCounts:
        """Name the processes not seen before, forget those gone, count per group."""
        tally = self._tracker.update(survey.usage, survey.clock)
        named = cast(
            dict[tuple[str, str], list[int]],
            {key: v for key, v in tally.gauges.items() if key is not None},
        )
        processes: dict[str, int] = {}
        for (name, _), (n, *_) in named.items():
            processes[name] = processes.get(name, 0) + n
        kept = _kept(processes, named, self._max_series, self._values)

        def group(key: tuple[str, str]) -> str:
            return key[0] if kept is None or key[0] in kept else OTHER

        counts = self._count(named, tally.oldest, group)
        if kept is not None:
            counts = counts._replace(folded=len(processes) - len(kept))
        counters = self._counters(tally, group, counts.processes)
        for name in counters[STARTED]:  # every group served: live, or gone while there is room
            for gauge in (counts.processes, counts.threads, counts.resident_bytes):
                gauge.setdefault(name, 0)
            counts.virtual_bytes.setdefault(name, 0)
        return counts._replace(counters=counters)

    def name_of(self, pid: int) -> str | None:
        """The group of the process ``pid`` as of the last update; None if no rule names it."""
        try:
            key = self._tracker.group_of(pid)
        except KeyError:
            return None
        return None if key is None else cast(tuple[str, str], key)[0]

    def _counters(
        self, tally: Tally, group: Callable[[tuple[str, str]], str], processes: dict[str, int]
    ) -> dict[tuple[str, str], dict[str, float]]:
        """Each group's counter totals, its (name, state) increments summed under ``group``;
        groups whose processes are gone are there too, while the cap has room."""
        increments: dict[GroupKey, list[int]] = {}
        for key, grew in tally.increments.items():
            if key is not None:
                total = increments.setdefault(group(cast(tuple[str, str], key)), [0] * len(grew))
                for i, amount in enumerate(grew):
                    total[i] += amount
        gauges: dict[GroupKey, list[int]] = {g: [n, 0, 0, 0] for g, n in processes.items()}
        totals = self._accounts.add(tally._replace(gauges=gauges, increments=increments), _one)
        return {
            column: {key[0]: total for key, total in series.items()}
            for column, series in totals.counters.items()
        }

    def _count(
        self,
        named: dict[tuple[str, str], list[int]],
        oldest: dict[Any, tuple[int, int]],
        group: Callable[[tuple[str, str]], str],
    ) -> GroupCounts:
        """The per-group values of the tracker's (name, state) gauges, ``group`` naming each."""
        counts = GroupCounts({}, {}, {}, {}, {}, {}, 0, self._unreadable)
        page, start_time = self._spec.page_size, self._spec.start_time
        for key, (n, rss, vsize, threads) in named.items():
            name = group(key)
            counts.processes[name] = counts.processes.get(name, 0) + n
            counts.threads[name] = counts.threads.get(name, 0) + threads
            counts.states[name, key[1]] = counts.states.get((name, key[1]), 0) + n
            counts.resident_bytes[name] = counts.resident_bytes.get(name, 0) + rss * page
            counts.virtual_bytes[name] = counts.virtual_bytes.get(name, 0) + vsize
            start = start_time(*oldest[key])
            if start is not None and start < counts.oldest_start.get(name, float("inf")):
                counts.oldest_start[name] = start
        return counts

    def _key(self, row: UsageRow, name: str | None) -> tuple[str, str] | None:
        return None if name is None else (name, self._spec.state(row[USAGE_STATE]))

    def _names(self, new: dict[int, bytes], earlier: Callable[[int], Any]) -> dict[int, Any]:
        """The group of each new process (its usage record by pid): from the rules, else
        (``children``) its nearest ancestor's; ``earlier`` gives a process seen before's."""
        decode = self._spec.decode
        names: dict[int, str | None] = {}
        for record in new.values():
            chain: dict[int, None] = {}  # new processes no rule names, each the child of the
            # next (a dict: a long chain, a hostile one, must not cost its square)
            current: UsageRow | None = decode(record)
            name: str | None = None
            while current is not None:
                pid = current[USAGE_PID]
                if pid in names:
                    name = names[pid]
                    break
                name = self._name(current)
                if name is not None or not self._children:
                    names[pid] = name
                    break
                chain[pid] = None
                ppid = current[USAGE_PPID]
                parent = new.get(ppid)
                if ppid < 1 or ppid in chain:
                    current = None
                elif parent is None:  # a process seen before: its group, if any
                    current, name = None, earlier(ppid)
                else:
                    current = decode(parent)
            for pid in chain:
                names[pid] = name
        return names

    def _name(self, row: UsageRow) -> str | None:
        pid = row[USAGE_PID]
        comm, user = comm_of(row[USAGE_COMM]), self._user_name(row[USAGE_UID])
        start = self._spec.start_time(row[USAGE_START], row[USAGE_START_FRACTION])
        cgroups = self._cgroups
        proc = Argv(comm, user, lambda: self._argv(pid), pid, start, lambda: cgroups(pid))
        name, unreadable = name_of(self._rules, proc)
        self._unreadable += unreadable
        return name


def _no_cgroups(_: int) -> tuple[str, ...]:
    return ()


def _one(name: GroupKey) -> tuple[str, ...]:
    return (str(name),)


def _kept(
    processes: dict[str, int], states: dict[tuple[str, str], Any], max_series: int, values: int
) -> set[str] | None:
    """The groups that keep their name so no metric has more than ``max_series`` series (the
    most processes first, name breaking ties), or None if all fit. ``other`` takes one series,
    one per state in the per-state metric, and ``values`` in a counter metric (as each group)."""
    if len(processes) * values <= max_series and len(states) <= max_series:
        return None
    state_count: dict[str, int] = {}
    for name, _ in states:
        state_count[name] = state_count.get(name, 0) + 1
    kept: set[str] = set()
    room = max_series - len(STATES)
    for name in sorted(processes, key=lambda g: (-processes[g], g)):
        room -= state_count[name]
        if room < 0 or (len(kept) + 2) * values > max_series:
            break
        kept.add(name)
    return kept
