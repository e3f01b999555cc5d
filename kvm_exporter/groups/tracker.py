"""Named process groups: each process named once, then processes counted per group.

A process (pid and start time) is named the first poll it is seen, from the rules of
``rules.py``; its arguments are read then, and only if a rule needs them, never again. With
``children`` (process-exporter's ``-children``), a new process no rule names joins the group of
its nearest ancestor that has one, as process-exporter's tracker does; a process whose parent
is gone or unnamed stays out. Processes no rule names are not counted, as in process-exporter.
Past ``max_series``, groups fold into ``other``: group names may come from
``{{.Matches.X}}``, which the processes' own arguments fill, and must not grow the series
count without bound. Whose names fold is :func:`_ranked`'s order: the admin's names (rules
whose names no process can choose) first, then the rules whose names processes choose, each
in its own share, so no user's name flood folds the admin's groups or another rule's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection
from itertools import chain, zip_longest
from typing import Any, NamedTuple, cast

from ..aggregate import OTHER
from ..records import (
    USAGE_COMM,
    USAGE_PID,
    USAGE_PPID,
    USAGE_START,
    USAGE_START_FRACTION,
    USAGE_STATE,
    USAGE_THREADS,
    USAGE_UID,
    Survey,
    UsageRow,
    UsageSpec,
    comm_of,
)
from ..states import STATES
from ..usage import STARTED, Accounts, Attribution, Tracker
from .details import DetailCounts, GroupDetails, ReadDetails, group_totals
from .rules import Argv, Rule, first_match


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
    thread_states: dict[tuple[str, str], int] = {}
    """Per (group, state), the threads of the processes with two or more, which
    process-exporter's ``namedprocess_namegroup_states`` adds to the processes' states; empty
    unless the grouper was given ``thread_states``."""
    details: DetailCounts | None = None
    """The details asked for (``groups.details``); their counters are in :attr:`counters`."""


ADMIN = -1
"""The share of the groups whose names no process chooses (see :func:`chosen_by_processes`):
ranked before every other. A group of a rule whose names processes choose has that rule's
index as its share."""

Named = tuple[str, int]
"""A process's group name and the share it counts in."""
_Key = tuple[str, int, str]
"""The tracker account of named processes: name, share (see :data:`ADMIN`), state."""


def chosen_by_processes(rule: Rule) -> bool:
    """Whether the processes a rule matches choose its group names, and so how many groups it
    makes. Any process can set its own comm (exec of a copy or a link, ``prctl``), argv[0]
    and arguments: ``{{.Comm}}`` is the admin's only under a ``comm`` selector (the name is
    one of its values), ``{{.ExeBase}}`` only under ``exe`` (one of its basenames),
    ``{{.ExeFull}}`` only under an ``exe`` of full paths; ``{{.Matches}}`` never is.
    ``{{.Username}}`` is not either: a user cannot pick a uid, but one with subordinate uids
    (``/etc/subuid``, rootless containers) runs processes under 65,536 of them, named by
    number. Any other field counts as the processes' too."""
    for kind, field in rule.parts:
        if kind == "text":
            continue
        if kind == "field" and field == "Comm" and rule.comm is not None:
            continue
        if kind == "field" and field == "ExeBase" and rule.exe is not None:
            continue
        if kind == "field" and field == "ExeFull" and rule.exe and all(p for _, p in rule.exe):
            continue
        return True
    return False


class Grouper:
    """Names processes and counts them per group, from a survey's usage records: a
    :class:`~kvm_exporter.usage.Tracker` whose accounts are (name, share, state), so a poll
    costs only the records that changed since the last; holds the names between polls."""

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
        thread_states: Callable[[int], list[str] | None] | None = None,
        details: tuple[ReadDetails, tuple[str, ...]] | None = None,
    ) -> None:
        """``series_per_group``: what a group has in the metrics served besides ours (with
        process-exporter's names, one per state it knows, every group); ``cgroups``: the
        source's reader of a process's cgroup paths, for ``{{.Cgroups}}`` (none: no cgroups);
        ``thread_states``: a process's thread states (None if gone), read each poll for the
        named processes of two or more threads (:attr:`GroupCounts.thread_states`);
        ``details``: the source's reader of a process's details and those to read."""
        self._cgroups = cgroups or _no_cgroups
        self._rules = rules
        self._children = children
        self._max_series = max_series
        self._argv = argv
        self._user_name = user_name
        self._spec = spec
        self._unreadable = 0
        self._thread_states = thread_states
        self._threaded: dict[int, _Key] = {}
        """The named processes of two or more threads, by pid, with their group when their
        record last changed (kept only with ``thread_states``)."""
        self._shares = tuple(i if chosen_by_processes(r) else ADMIN for i, r in enumerate(rules))
        self._tracker = Tracker(Attribution(self._key, self._names), spec, oldest=True)
        columns = dict.fromkeys((metric, value) for metric, value, _ in spec.counters)
        self._values = max([*Counter(metric for metric, _ in columns).values(), series_per_group])
        """Most series a group has in one metric but the per-state one: a counter's label
        values (cpu: user and system), or ``series_per_group``."""
        self._accounts = Accounts(("group",), max_series // self._values, spec)
        self._details = (
            None if details is None else GroupDetails(*details, spec, max_series // self._values)
        )

    def update(self, survey: Survey) -> GroupCounts:
        """Name the processes not seen before, forget those gone, count per group."""
        tally = self._tracker.update(survey.usage, survey.clock)
        named = cast(
            dict[_Key, list[int]], {key: v for key, v in tally.gauges.items() if key is not None}
        )
        processes: dict[str, int] = {}
        for (name, _, _), (n, *_) in named.items():
            processes[name] = processes.get(name, 0) + n
        kept = _kept(processes, named, tally.oldest, self._max_series, self._values)

        def group(key: _Key) -> str:
            return key[0] if kept is None or key[0] in kept else OTHER

        counts = self._count(named, tally.oldest, group)
        if self._thread_states is not None:
            counts = counts._replace(thread_states=self._threads(self._thread_states, group))
        if kept is not None:
            counts = counts._replace(folded=len(processes) - len(kept))
        counters = group_totals(self._accounts, tally, group, counts.processes)
        for name in counters[STARTED]:  # every group served: live, or gone while there is room
            for gauge in (counts.processes, counts.threads, counts.resident_bytes):
                gauge.setdefault(name, 0)
            counts.virtual_bytes.setdefault(name, 0)
        if self._details is not None:
            found = self._details.poll(
                self.name_of, lambda name: group((name, ADMIN, "")), counts.processes, survey.clock
            )
            counts = counts._replace(details=found)
            counters.update(found.counters)
        return counts._replace(counters=counters)

    def name_of(self, pid: int) -> str | None:
        """The group of the process ``pid`` as of the last update; None if no rule names it."""
        key = self._tracker.account(pid)
        return None if key is None else cast(_Key, key)[0]

    def _count(
        self,
        named: dict[_Key, list[int]],
        oldest: dict[Any, tuple[int, int]],
        group: Callable[[_Key], str],
    ) -> GroupCounts:
        """The per-group values of the tracker's (name, state) gauges, ``group`` naming each."""
        counts = GroupCounts({}, {}, {}, {}, {}, {}, 0, self._unreadable)
        page, start_time = self._spec.page_size, self._spec.start_time
        for key, (n, rss, vsize, threads) in named.items():
            name = group(key)
            counts.processes[name] = counts.processes.get(name, 0) + n
            counts.threads[name] = counts.threads.get(name, 0) + threads
            counts.states[name, key[2]] = counts.states.get((name, key[2]), 0) + n
            counts.resident_bytes[name] = counts.resident_bytes.get(name, 0) + rss * page
            counts.virtual_bytes[name] = counts.virtual_bytes.get(name, 0) + vsize
            start = start_time(*oldest[key])
            if start is not None and start < counts.oldest_start.get(name, float("inf")):
                counts.oldest_start[name] = start
        return counts

    def _threads(
        self, read: Callable[[int], list[str] | None], group: Callable[[_Key], str]
    ) -> dict[tuple[str, str], int]:
        """The threads per (group, state) of the named processes with two or more."""
        out: dict[tuple[str, str], int] = {}
        for pid, key in list(self._threaded.items()):
            if self._tracker.account(pid) != key:  # gone, or named anew since
                del self._threaded[pid]
                continue
            states = read(pid) or ()
            if len(states) > 1:  # as process-exporter: a lone thread is the process itself
                name = group(key)
                for state in states:
                    out[name, state] = out.get((name, state), 0) + 1
        return out

    def _key(self, row: UsageRow, named: Named | None) -> _Key | None:
        if self._details is not None:
            self._details.note(row, None if named is None else named[0])
        if named is None:
            return None
        key = (*named, self._spec.state(row[USAGE_STATE]))
        if self._thread_states is not None:
            if row[USAGE_THREADS] > 1:
                self._threaded[row[USAGE_PID]] = key
            else:
                self._threaded.pop(row[USAGE_PID], None)
        return key

    def _names(self, new: dict[int, bytes], earlier: Callable[[int], Any]) -> dict[int, Any]:
        """The group of each new process (its usage record by pid): from the rules, else
        (``children``) its nearest ancestor's; ``earlier`` gives a process seen before's."""
        decode = self._spec.decode
        names: dict[int, Named | None] = {}
        for record in new.values():
            chain: dict[int, None] = {}  # new processes no rule names, each the child of the
            # next (a dict: a long chain, a hostile one, must not cost its square)
            current: UsageRow | None = decode(record)
            name: Named | None = None
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

    def _name(self, row: UsageRow) -> Named | None:
        pid = row[USAGE_PID]
        comm, user = comm_of(row[USAGE_COMM]), self._user_name(row[USAGE_UID])
        start = self._spec.start_time(row[USAGE_START], row[USAGE_START_FRACTION])
        cgroups = self._cgroups
        proc = Argv(comm, user, lambda: self._argv(pid), pid, start, lambda: cgroups(pid))
        name, rule, unreadable = first_match(self._rules, proc)
        self._unreadable += unreadable
        return None if name is None else (name, self._shares[rule])


def _no_cgroups(_: int) -> tuple[str, ...]:
    return ()


def _kept(
    processes: dict[str, int],
    keys: Collection[_Key],
    oldest: dict[Any, tuple[int, int]],
    max_series: int,
    values: int,
) -> set[str] | None:
    """The groups that keep their name so no metric has more than ``max_series`` series, in
    :func:`_ranked`'s order, or None if all fit. ``other`` takes one series, one per state in
    the per-state metric, and ``values`` in a counter metric (as each group)."""
    if len(processes) * values <= max_series and len(keys) <= max_series:
        return None  # (a name from two shares has its states twice in keys: fewer fit)
    state_count: dict[str, int] = {}
    share: dict[str, int] = {}
    first: dict[str, tuple[int, int]] = {}
    for key in keys:
        name, rule, _ = key
        state_count[name] = state_count.get(name, 0) + 1
        share[name] = min(share.get(name, rule), rule)  # a name the admin's rules give too
        first[name] = min(first.get(name, oldest[key]), oldest[key])
    kept: set[str] = set()
    room = max_series - len(STATES)
    for name in _ranked(processes, share, first):
        room -= state_count[name]
        if room < 0 or (len(kept) + 2) * values > max_series:
            break
        kept.add(name)
    return kept


def _ranked(
    processes: dict[str, int], share: dict[str, int], oldest: dict[str, tuple[int, int]]
) -> list[str]:
    """The groups in the order they keep their names: first those named by the admin (the
    :data:`ADMIN` share), then the rules whose names processes choose, in turns (each rule's
    first, then each one's second...), so each has an equal share of what is left and what
    one leaves goes to the others. In a share, the most processes first, then the oldest
    process (a flood's newcomers cannot outrank a running service by name), then the name."""
    shares: dict[int, list[str]] = {}
    for name in processes:
        shares.setdefault(share[name], []).append(name)
    for names in shares.values():
        names.sort(key=lambda g: (-processes[g], oldest[g], g))
    admin = shares.pop(ADMIN, [])
    turns = zip_longest(*(shares[rule] for rule in sorted(shares)))
    return admin + [name for name in chain.from_iterable(turns) if name is not None]
