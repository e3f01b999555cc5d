"""The top processes by CPU and by resident memory, as series a Prometheus can afford.

One more stage over what a poll has already, never a second walk: the
:class:`~kvm_exporter.usage.Tracker` hands a :class:`Watch` each row it decodes (a process
new, or whose record changed) with what its own counters grew by, and the pids of the
processes gone. A record that did not change used no CPU, so the CPU ranking is over the
changed rows only. Resident memory is in every record: the watch keeps each process's resident
pages by pid, and a few more than the set needs above a floor, so ranking by memory looks at
those few, not at every process (a full ranking of 100,000 processes costs milliseconds).

The series budget: a process enters a set when it ranks in the top ``n`` (and, in a full set,
beats a member by :data:`MARGIN`), and stays while it ranks within ``2 n`` or is within
:data:`MARGIN` of the ``n``-th; so a tie, flat or jittering, does not flap, a set holds at
most ``2 n`` processes and at most ``n`` enter per poll. A process that used no CPU in the
interval is never in the CPU set, one with no resident memory never in the memory set.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping
from operator import itemgetter, mul
from typing import NamedTuple, cast

from .records import (
    USAGE_COMM,
    USAGE_COUNTERS,
    USAGE_PID,
    USAGE_RSS_PAGES,
    USAGE_START,
    USAGE_START_FRACTION,
    UsageRow,
    UsageSpec,
    comm_of,
)

CPU, MEMORY = "cpu", "memory"
DIMENSIONS = (CPU, MEMORY)
"""What processes can be ranked by (``top.by``)."""

MARGIN = 0.25
"""How much a process must beat a member by to join a full set, and how far a member may fall
below the ``n``-th before it leaves: jitter under it (processes of nearly equal use) makes
no new series (bench/top.py measures the churn)."""

CANDIDATES = 4
"""Processes the memory ranking keeps above its floor, per place in the set: with more, a
full ranking (when too many of them exit or shrink) is rarer and each poll's costs more."""


class TopProcess(NamedTuple):
    """One process of a top set, as the last poll saw it."""

    labels: tuple[str, ...]
    """Values of :attr:`TopProcesses.labels`: pid, comm, its account's labels, and where asked
    for the named group and the command line."""
    cpu_seconds: dict[str, float]
    """Its own CPU time since it started, by mode (none from a crash dump)."""
    resident_bytes: int
    start_time: float | None
    """Seconds since the epoch; None where the source has no start times (a crash dump)."""


class TopProcesses(NamedTuple):
    """One poll's top sets, by CPU and by memory, as one list (a process in both is one)."""

    labels: tuple[str, ...]
    processes: tuple[TopProcess, ...]


_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))} | {
    0xDC00 + b: f"\\x{b:02x}" for b in range(0x80, 0x100)
}
"""Control characters (C0, DEL, C1) as escapes, and bytes that are not UTF-8 (read as lone
surrogates) as the same, as group names show them: a command line may hold any of them."""


def escape_cmdline(argv: Iterable[str], chars: int) -> str:
    """The first ``chars`` characters of the arguments joined by spaces, control characters
    and bytes that are not UTF-8 escaped (``\\x0a``, ``\\xff``): a label never carries a
    newline or a terminal escape."""
    return " ".join(argv)[:chars].translate(_ESCAPES)


def _columns(columns: list[int]) -> Callable[[list[int]], tuple[int, ...]]:
    """A getter of ``columns`` of a list as a tuple, however many they are."""
    if len(columns) < 2:  # itemgetter of one gives it bare, of none is an error
        return lambda values: tuple(values[i] for i in columns)
    return cast(Callable[[list[int]], tuple[int, ...]], itemgetter(*columns))


def choose(
    candidates: dict[int, float], value: Mapping[int, float], members: set[int], n: int
) -> set[int]:
    """This poll's set: ``members`` that stay, and what enters of the top ``n``.

    ``candidates`` (pid -> value) hold at least the top ``2 n`` of all values; ``value`` has
    every process's. A member stays while it ranks within ``2 n`` or has at least
    ``1 - MARGIN`` of the ``n``-th's value. A process enters when it ranks in the top ``n``
    and the set has fewer than ``n`` processes, or its value beats the smallest member's by
    :data:`MARGIN`. Past ``2 n``, the smallest go. Ties go to members."""
    ranked = heapq.nlargest(2 * n, candidates, key=lambda pid: (candidates[pid], pid in members))
    if not ranked:
        return set()
    bar = (1 - MARGIN) * candidates[ranked[:n][-1]]
    chosen = {pid for pid in members if value.get(pid, 0) >= bar} | members.intersection(ranked)
    stayed = set(chosen)
    least = min((value[pid] for pid in chosen), default=0)
    for pid in ranked[:n]:
        if pid not in chosen:
            if len(chosen) >= n and candidates[pid] <= (1 + MARGIN) * least:
                break  # no smaller one would enter either
            chosen.add(pid)
    if len(chosen) > 2 * n:
        chosen = set(heapq.nlargest(2 * n, chosen, key=lambda p: (value[p], p in stayed)))
    return chosen


class Watch:
    """The top sets, fed by a tracker: :meth:`put` each row it decodes, :meth:`gone` the
    pids gone, then :meth:`rank` once per poll."""

    def __init__(self, n: int, by: tuple[str, ...], spec: UsageSpec) -> None:
        self.n = n
        self.decode = spec.decode
        cpu = [i for i, (metric, _, _) in enumerate(spec.counters) if metric == "cpu"]
        self._cpu_of = _columns(cpu)
        """The own CPU columns of a row's growth, as a tuple (C speed: every row is put)."""
        self._scales = [spec.counters[i][2] for i in cpu]
        self._by_cpu = CPU in by and bool(cpu)  # a crash dump has no usage
        self._by_memory = MEMORY in by
        self.reset()

    def reset(self) -> None:
        """Forget every process (the tracker starts afresh)."""
        self._records: dict[int, bytes] = {}
        """Each process's record, by pid: a member's row, decoded when chosen."""
        self._rss: dict[int, int] = {}
        """Each process's resident pages, by pid (ranking by memory)."""
        self._high: set[int] = set()
        self._floor = -1
        """No process outside ``_high`` has more resident pages than ``_floor``; -1: no floor
        yet (the first poll, or a host of few processes): every process is ranked."""
        self._grew: dict[int, float] = {}
        """CPU seconds each process used since the last poll, of those that used some."""
        self._members: dict[str, set[int]] = {CPU: set(), MEMORY: set()}
        self._cmdlines: dict[int, tuple[int, str]] = {}
        """The command line label of each member it was read for: (start, text), by pid."""

    def put(self, record: bytes, row: UsageRow, grew: list[int]) -> None:
        """A process new or changed: its record, its row and what its counters grew by."""
        pid = row[USAGE_PID]
        self._records[pid] = record
        if self._by_cpu:
            used = self._cpu_of(grew)
            if any(used):
                self._grew[pid] = sum(map(mul, used, self._scales))
        if self._by_memory:
            rss = self._rss[pid] = row[USAGE_RSS_PAGES]
            if rss > self._floor >= 0:
                self._high.add(pid)

    def gone(self, pids: Iterable[int]) -> None:
        """Processes gone (or whose pid a new process took: it is :meth:`put` after)."""
        for pid in pids:
            del self._records[pid]
            self._rss.pop(pid, None)
            self._high.discard(pid)
            self._cmdlines.pop(pid, None)
            for members in self._members.values():
                members.discard(pid)

    def members(self, by: str) -> frozenset[int]:
        """The pids of the set ranked ``by`` (:data:`CPU`, :data:`MEMORY`) at the last poll."""
        return frozenset(self._members[by])

    def rank(self) -> list[UsageRow]:
        """This poll's top sets, as the rows of their processes (each once)."""
        grew, self._grew = self._grew, {}
        chosen: dict[int, None] = {}
        if self._by_cpu:
            self._members[CPU] = choose(grew, grew, self._members[CPU], self.n)
            chosen.update(dict.fromkeys(self._members[CPU]))
        if self._by_memory:
            rss, members = self._rss, self._members[MEMORY]
            self._members[MEMORY] = choose(self._memory(), rss, members, self.n)
            chosen.update(dict.fromkeys(self._members[MEMORY]))
        for pid in self._cmdlines.keys() - chosen.keys():
            del self._cmdlines[pid]  # out of the sets: read afresh if it comes back
        return [self.decode(self._records[pid]) for pid in chosen]

    def _memory(self) -> dict[int, float]:
        """Resident pages of the processes that can rank in the top ``2 n``: those at or above
        the floor. When fewer than ``2 n`` are left there (exited, shrunk) or too many have
        risen above it, every process is ranked afresh and the floor set under the top
        :data:`CANDIDATES` ``n`` (rare: the poll that does it costs milliseconds at 100,000)."""
        rss, want, floor = self._rss, 2 * self.n, self._floor
        self._high = {pid for pid in self._high if rss[pid] >= floor}
        high = len(self._high)
        if floor < 0 or high < min(want, len(rss)) or high > 4 * CANDIDATES * self.n:
            kept = heapq.nlargest(CANDIDATES * self.n, rss, key=rss.__getitem__)
            floor = self._floor = rss[kept[-1]] if len(kept) < len(rss) else -1
            members = {pid for pid in self._members[MEMORY] if rss[pid] >= floor}
            self._high = set(kept) | members  # a member tied at the floor stays a candidate
        return {pid: rss[pid] for pid in self._high if rss[pid]}  # none: not in the set

    def cmdline(
        self, row: UsageRow, argv: Callable[[int], tuple[str, ...] | None], chars: int
    ) -> str:
        """The command line label of a member: read when it joins, kept while it stays (a
        process that rewrites its title does not make new series)."""
        pid, start = row[USAGE_PID], row[USAGE_START]
        known = self._cmdlines.get(pid)
        if known is None or known[0] != start:
            known = self._cmdlines[pid] = (start, escape_cmdline(argv(pid) or (), chars))
        return known[1]


def report(
    chosen: Iterable[tuple[UsageRow, tuple[str, ...]]], spec: UsageSpec
) -> tuple[TopProcess, ...]:
    """The series of the top sets: each row with its label values after pid and comm."""
    cpu = [(i, value, scale) for i, (m, value, scale) in enumerate(spec.counters) if m == "cpu"]
    out = []
    for row, labels in chosen:
        seconds: dict[str, float] = {}
        for i, mode, scale in cpu:
            seconds[mode] = seconds.get(mode, 0.0) + row[USAGE_COUNTERS + i] * scale
        out.append(
            TopProcess(
                (str(row[USAGE_PID]), comm_of(row[USAGE_COMM]), *labels),
                seconds,
                row[USAGE_RSS_PAGES] * spec.page_size,
                spec.start_time(row[USAGE_START], row[USAGE_START_FRACTION]),
            )
        )
    return tuple(sorted(out))
