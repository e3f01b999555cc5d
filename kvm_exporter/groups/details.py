"""The named groups' details (``groups.details``): what the source reads of each named process
beyond its usage record, once a poll, summed per group.

Only processes a rule named are read, never the rest of the host: each detail costs the
source a file or two per named process per poll. Gauges (open descriptors, swapped and
proportional memory) are this poll's sums, the fd ratio its worst; the counters (bytes read
and written, context switches) are kept as the usage counters are, by a
:class:`~kvm_exporter.usage.Tracker` and :class:`~kvm_exporter.usage.Accounts` of their own
over records made of the details: a process first seen is a baseline (all it used if born
since the last poll), an exit or a reused pid never takes anything off, and a group keeps
its totals while it folds or idles. A sum over live threads (context switches) drops when one
exits: like any counter of a process that goes down, the tracker takes that poll's growth as
nothing, so it takes nothing off the group's other processes. A process whose file for a
counter was refused this poll is left out of that counter's records, so once readable it
comes back as a baseline, not as its whole past at once. A read refused is counted, as
process-exporter counts it: its ``status`` or ``limits`` (process-exporter's basics) in
``procread_errors``, the others (``io``, ``fd``, ``smaps_rollup``) in ``partial_errors``,
at most one of each per process and poll; a process gone before its read is not an error.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Collection
from typing import Any, NamedTuple

from ..records import (
    DETAIL_FILES,
    USAGE_PID,
    USAGE_START,
    USAGE_START_FRACTION,
    USAGE_STATE,
    Details,
    UsageRow,
    UsageSpec,
)
from ..usage import STARTED, Accounts, Attribution, Tally, Tracker

ReadDetails = Callable[[int, Collection[str]], Details | None]
"""A source's reader of one process's details (None: the process has gone)."""

_COUNTERS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "io": (("io_bytes", "read", "read_bytes"), ("io_bytes", "write", "write_bytes")),
    "status": (
        ("context_switches", "voluntary", "voluntary_switches"),
        ("context_switches", "involuntary", "involuntary_switches"),
    ),
}
"""The counters of each detail that has some: (metric, label value, :class:`Details` field)."""

GAUGES: dict[str, tuple[str, ...]] = {
    "fd": ("open_fds", "fd_ratio"),
    "status": ("swap_bytes",),
    "smaps": ("proportional_bytes", "proportional_swap_bytes"),
}
"""The gauges of each detail (:class:`Details` fields), summed per group but ``fd_ratio``,
the group's worst."""

BASICS = ("status", "limits")
"""Files whose refusal process-exporter counts as a failed read of the process."""

_IDENTITY = "=qQQqqqQqqq0s"
"""A detail record's first fields: a usage record's (:data:`~kvm_exporter.records.UsageRow`),
of which it fills pid, start and state (so zombies freeze as the usage counters do)."""


class DetailCounts(NamedTuple):
    """One poll's details per group (the groups ``processes`` had, with 0 where none read)."""

    gauges: dict[str, dict[str, float]]
    """Per :class:`Details` field of :data:`GAUGES` asked for, each group's value."""
    counters: dict[tuple[str, str], dict[str, float]]
    """Per (metric, label value), each group's total since the exporter started."""
    procread_errors: int
    partial_errors: int
    """Named processes refused a read, since the exporter started (see the module's text)."""
    refused: dict[str, int]
    """Refused reads since the exporter started, by file."""


class _Counted:
    """The counters of one detail: a tracker and accounts of their own, over detail records."""

    def __init__(self, detail: str, spec: UsageSpec, max_groups: int) -> None:
        columns = _COUNTERS[detail]
        (self.file,) = DETAIL_FILES[detail]
        self.fields = tuple(field for _, _, field in columns)
        self._layout = struct.Struct(_IDENTITY + "q" * 2 * len(columns))  # own, children's
        spec = spec._replace(
            page_size=1,
            counters=tuple((metric, value, 1.0) for metric, value, _ in columns),
            decode=self._layout.unpack,
            reaped=frozenset(),  # no children's columns: nothing netted for reapers
        )
        self.names: dict[int, str] = {}
        """This poll's group of each process in :attr:`records`, by pid."""
        self.records: list[bytes] = []
        attach = lambda new, _: {pid: self.names[pid] for pid in new}  # noqa: E731
        self.tracker = Tracker(Attribution(lambda _, name: name, attach), spec)
        self.accounts = Accounts(("group",), max_groups, spec)

    def add(self, identity: tuple[int, int, int, int], name: str, details: Details) -> None:
        """Put a process's record in this poll's."""
        values = [getattr(details, field) for field in self.fields]
        pid, start, fraction, state = identity
        zeros = [0] * len(values)
        self.records.append(
            self._layout.pack(pid, start, fraction, 0, 0, 0, 0, 0, 0, state, b"", *values, *zeros)
        )
        self.names[pid] = name


class GroupDetails:
    """Reads the asked details of the named processes each poll and sums them per group."""

    def __init__(
        self, read: ReadDetails, wanted: tuple[str, ...], spec: UsageSpec, max_groups: int
    ) -> None:
        self.wanted = wanted
        self._read = read
        self._counted = [_Counted(d, spec, max_groups) for d in wanted if d in _COUNTERS]
        self._gauges = tuple(field for d in wanted for field in GAUGES.get(d, ()))
        self._named: dict[int, tuple[tuple[int, int, int, int], str]] = {}
        """The named processes by pid: pid, start, fraction and state of their last record,
        and their group."""
        self._procread_errors = self._partial_errors = 0
        self._refused = dict.fromkeys((f for d in wanted for f in DETAIL_FILES[d]), 0)

    def note(self, row: UsageRow, name: str | None) -> None:
        """Told of each record new or changed in a poll: its process's group (None: none)."""
        pid = row[USAGE_PID]
        if name is None:
            self._named.pop(pid, None)
        else:
            start, fraction = row[USAGE_START], row[USAGE_START_FRACTION]
            self._named[pid] = ((pid, start, fraction, row[USAGE_STATE]), name)

    def poll(
        self,
        named: Callable[[int], str | None],
        fold: Callable[[str], str],
        processes: dict[str, int],
        clock: int,
    ) -> DetailCounts:
        """Read the details of the named processes (``named``: a pid's group now, None if
        gone or unnamed); ``fold`` gives the group a name is served as, ``processes`` the
        processes per served group, ``clock`` the poll's (:attr:`Survey.clock`)."""
        gauges = {field: dict.fromkeys(processes, 0.0) for field in self._gauges}
        for counted in self._counted:
            counted.records, counted.names = [], {}
        for pid, (identity, name) in list(self._named.items()):
            if named(pid) != name:  # gone, or the pid is another process's by now
                del self._named[pid]
                continue
            details = self._read(pid, self.wanted)
            if details is None:
                continue  # gone since the poll's walk: not an error
            if details.refused:
                self._procread_errors += any(f in BASICS for f in details.refused)
                self._partial_errors += any(f not in BASICS for f in details.refused)
                for file in details.refused:
                    self._refused[file] += 1
            group = fold(name)
            for field, values in gauges.items():
                value = getattr(details, field)
                if field == "fd_ratio":
                    values[group] = max(values.get(group, 0.0), value)
                else:
                    values[group] = values.get(group, 0.0) + value
            for counted in self._counted:
                if counted.file not in details.refused:
                    counted.add(identity, name, details)
        counters: dict[tuple[str, str], dict[str, float]] = {}
        for counted in self._counted:
            tally = counted.tracker.update(counted.records, clock)
            totals = group_totals(counted.accounts, tally, fold, processes)
            counters.update((c, v) for c, v in totals.items() if c != STARTED)
        return DetailCounts(
            gauges, counters, self._procread_errors, self._partial_errors, dict(self._refused)
        )


def group_totals(
    accounts: Accounts, tally: Tally, group: Callable[[Any], str], processes: dict[str, int]
) -> dict[tuple[str, str], dict[str, float]]:
    """Each served group's counter totals (:data:`~kvm_exporter.usage.STARTED` too): the
    tally's increments summed per ``group`` of their key, kept by ``accounts``; groups whose
    processes are gone are there too, while the cap has room (``processes``: per group)."""
    increments: dict[Any, list[int]] = {}
    for key, grew in tally.increments.items():
        if key is not None:
            total = increments.setdefault(group(key), [0] * len(grew))
            for i, amount in enumerate(grew):
                total[i] += amount
    gauges: dict[Any, list[int]] = {g: [n, 0, 0, 0] for g, n in processes.items()}
    totals = accounts.add(tally._replace(gauges=gauges, increments=increments), _one)
    return {
        column: {key[0]: total for key, total in series.items()}
        for column, series in totals.counters.items()
    }


def _one(name: Any) -> tuple[str, ...]:
    return (str(name),)
