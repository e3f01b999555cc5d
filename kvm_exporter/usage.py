"""What processes consume, per account: usage rows in, gauges and truthful counters out.

An account is what a process's usage is charged to: here, its values of ``resources.labels``
(user, jail, cgroup); for the named groups' tracker (``groups/tracker.py``), its named group
and state. "Group" is kept for process-exporter's named groups.

Two steps, both pure (no Prometheus, no platform):

- :class:`Tracker` keeps each process's last record, keyed by pid and start time, and turns a
  poll's records into per-account gauges and the counters' *increments* since the last poll.
  Which account a process is charged to is one pluggable step, an :class:`Attribution`.
- :class:`Accounts` names the accounts (their label values: the series; two uids of one name
  are one series), folds the smallest into ``other`` under the series cap and keeps each
  counter at the series level, so folding, pid reuse, a uid change or an exit never makes a
  counter go down or jump.

What a counter includes: for each process, what it consumed between two polls that saw it,
plus, for a process born since the previous poll, everything it consumed before the first poll
that saw it. Not included: what a process consumed between the last poll that saw it and its
exit (at most one interval), and what processes consumed before the exporter's first poll,
which takes every process as a baseline (so counters start at 0 with the exporter).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

from .aggregate import OTHER, Key
from .config import TopConfig
from .records import (
    USAGE_COUNTERS,
    USAGE_JID,
    USAGE_PID,
    USAGE_PPID,
    USAGE_RSS_PAGES,
    USAGE_START,
    USAGE_START_FRACTION,
    USAGE_STATE,
    USAGE_THREADS,
    USAGE_UID,
    USAGE_VSIZE,
    Digests,
    Hashes,
    Records,
    Source,
    SourceError,
    Survey,
    UsageRow,
    UsageSpec,
)
from .top import TopProcesses, Watch, report

AccountKey = Hashable
"""An account before naming: raw values (a tuple of a uid, a jid, a cgroup path...; a named
group and state for the named groups' tracker)."""


class Attribution(NamedTuple):
    """Which account a process is charged to."""

    key: Callable[[UsageRow, Any], AccountKey]
    """The account of a row, given what :attr:`attach` gave that process; asked whenever its
    row changes, so a process that changes uid or jail moves its future increments to its
    new account."""
    attach: Callable[[dict[int, bytes], Callable[[int], Any]], dict[int, Any]] | None = None
    """Asked once per poll, with the usage records by pid of the processes (pid and start
    time) first seen in it, and never again for them: what each has for good (a cgroup, a
    named group's name), by pid. Its second argument gives what a process seen before and
    still alive got, by pid (None if none)."""


class Tally(NamedTuple):
    """One poll of :class:`Tracker`: per account, gauges and counter increments."""

    gauges: dict[AccountKey, list[int]]
    """[processes, resident pages, virtual bytes, threads] of each account that has processes
    (a process counts at least one thread: a zombie has none)."""
    increments: dict[AccountKey, list[int]]
    """Per account, each counter column's increase since the previous poll, then the number of
    processes first seen in it after the first poll (only accounts with one)."""
    jids: set[int]
    """The jails that have processes."""
    oldest: dict[AccountKey, tuple[int, int]]
    """(start, fraction) of each account's oldest process, where the tracker keeps them."""


class _Seen(NamedTuple):
    attached: Any
    account: AccountKey


_EXITED = frozenset(("zombie", "dead"))
"""States of a process that has exited and waits to be reaped."""

_FRACTIONS = 1 << 32
"""More than any start's fraction (FreeBSD's microseconds)."""


def _start(row: UsageRow) -> int:
    """A row's start and its fraction as one int that sorts as they do."""
    return int(row[USAGE_START] * _FRACTIONS + row[USAGE_START_FRACTION])


Netted = list[tuple[tuple[int, ...], tuple[int, ...]]]
"""Quantities netted for reapers: for each, counter columns and their integer weights."""


def _netted(spec: UsageSpec) -> Netted:
    """Per (metric, value) whose reaped children's usage the kernel reports
    (:attr:`UsageSpec.reaped`): its columns, the finest first, weighed in units of the finest."""
    columns: dict[tuple[str, str], list[tuple[float, int]]] = {}
    for i, (metric, value, scale) in enumerate(spec.counters):
        if spec.reaped is None or metric in spec.reaped:
            columns.setdefault((metric, value), []).append((scale, i))
    netted: Netted = []
    for scaled in columns.values():
        scaled.sort()
        finest = scaled[0][0]
        netted.append((tuple(i for _, i in scaled), tuple(round(s / finest) for s, _ in scaled)))
    return netted


class Tracker:
    """Per process state between polls; memory is bounded by the processes of the last poll.

    A poll's usage records are compared with the last poll's by digests, as sets (in C where
    the records come digested, else Python's hashes of their bytes): only a record that
    changed is decoded and looked at, so a host whose processes mostly idle between polls
    costs little more than the read.

    Reaped children: what a process's children's usage grew by is what it reaped in the
    interval, each child's final totals (own plus its children's). Of that, the totals each
    reaped child had at its last poll were counted already (or, for a child first seen mid-life,
    were its baseline): they are taken off, so what is left, the children's use since their
    last poll and children no poll saw, goes to the reaper's account. A gone child's totals are
    taken off its nearest ancestor still alive (its parent, or through gone parents, the one
    that reaped them); where that leaves too little, off the next ancestor up (an orphan that
    init or a subreaper reaped). A zombie is as good as gone: its row adds nothing and its
    totals are those of its last live row (FreeBSD adds its children's usage into a zombie's
    own, kern_exit.c exit1). A quantity of a process's own that went down (a sum over its live
    threads when one exits) adds nothing that poll, and grows from there: it takes nothing
    off its account's other processes.
    """

    def __init__(
        self,
        attribution: Attribution,
        spec: UsageSpec,
        oldest: bool = False,
        watch: Watch | None = None,
    ) -> None:
        self.attribution = attribution
        self.decode = spec.decode
        self._state = spec.state
        self._width = len(spec.counters)
        """Counter columns of each kind: a row has as many again for the reaped children."""
        self._netted = _netted(spec)
        """Each quantity netted for reapers: its columns and their integer weights."""
        self._own = _netted(spec._replace(reaped=None))
        """Each quantity of a process's own counter columns (FreeBSD's seconds and
        microseconds as one), weighed as :attr:`_netted`'s."""
        self._oldest = oldest
        self.watch = watch
        """The top processes' stage, told of every row decoded and every process gone."""
        self._reset()

    def _reset(self) -> None:
        """Forget every process: the next update is a first poll (a baseline)."""
        self._records: dict[int, bytes] = {}
        """The last poll's record of each process, by digest (:class:`Records`' or Python's
        hash of its bytes): bytes made when the record last changed, the same objects the
        watch keeps, not a copy each poll."""
        self._digests: Digests | None = None
        """The digests of the last poll's records (compared with the next poll's as sets,
        in C where they are compiled)."""
        self._seen: dict[int, _Seen] = {}
        self._shared: dict[_Seen, _Seen] = {}
        """One object per distinct :class:`_Seen`: processes share theirs (a few kinds for
        thousands of processes), which holds the memory per process to its dict entry."""
        self._shared_kept = 0
        """Kinds in ``_shared`` when it was last rebuilt from the live processes."""
        self._gauges: dict[AccountKey, list[int]] = {}
        self._jids: dict[int, int] = {}
        """Processes per jail."""
        self._starts: dict[tuple[AccountKey, int], int] | None = {} if self._oldest else None
        """With ``oldest``: processes per (account, start) of every account but None (no
        account: most processes, where only a few are named), a start and its fraction as one
        int (:func:`_start`). One table, not one per account: a burst of 3,000 one-process
        groups made 3,000 small dicts (0.9 MiB at its peak, and the Python heap a burst grows
        stays grown, issue 23)."""
        self._frozen: dict[int, list[int]] = {}
        """The counters each zombie is taken to have (own, then children's), by pid: its last
        live row's, plus what it reaped after that poll of children a poll saw."""
        self._exited_ch: dict[int, UsageRow] = {}
        """Each zombie's children's counters as its row shows them (after it exited)."""
        self._owed: dict[int, list[int]] = {}
        """What a reaper was short of at the last poll, by pid: taken off its next growth
        only. The walk of the process table is not atomic: it may read a reaper before, and
        miss the child it reaps after."""
        self._clock: int | None = None
        """The clock of the previous poll; None before the first."""
        if self.watch is not None:
            self.watch.reset()

    def update(self, records: Sequence[bytes], clock: int) -> Tally:
        """Take one poll's usage records (read when the clock said ``clock``).

        A process seen before (same pid and start) adds what its counters grew by, and what
        its reaped children grew by less what was counted of them already. A new one adds
        nothing (its counters are its baseline), unless it started at or after the previous
        poll's clock: then it adds all it and its reaped children have used (no spike: at most
        one interval's worth). Vanished processes are dropped, their gauges taken off their
        account.
        """
        try:
            return self._update(records, clock)
        except BaseException:
            self._reset()  # half updated, the state would fail every later update
            raise

    def _update(self, records: Sequence[bytes], clock: int) -> Tally:
        decode, born_since = self.decode, self._clock
        # Rows are decoded one at a time and dropped (a row is a tuple of a dozen ints: all
        # of a first poll's at once would be megabytes the allocator keeps); what must last
        # until the next pass is kept as the record bytes, alive anyway.
        # Records' bytes are made only for what changed; a list's are there already.
        digests = records.digests if isinstance(records, Records) else Hashes(records)
        fresh, stale = digests.changes(self._digests)  # new or changed; changed or gone
        left: dict[int, tuple[bytes, _Seen]] = {}  # changed or gone: the last record, by pid
        for digest in stale:
            record = self._records.pop(digest)
            row = decode(record)
            seen = self._seen.pop(row[USAGE_PID])
            left[row[USAGE_PID]] = (record, seen)
            self._take(row, seen)
        increments: dict[AccountKey, list[int]] = {}
        reaped: dict[int, list[int]] = {}  # per reaper pid: its children's usage growth
        new: dict[int, bytes] = {}  # first seen in this poll: the record, by pid
        for at in fresh:
            record = self._records[digests.digest(at)] = records[at]
            row = decode(record)
            pid = row[USAGE_PID]
            last = left.get(pid)
            if last is not None and _start(base := decode(last[0])) == _start(row):
                del left[pid]  # the same process, changed
                self._add(self._continued(row, base), last[1].attached, increments, reaped, record)
            else:  # new, or the pid was reused by a new process
                new[pid] = record
        if left:  # what is left is gone: its counted totals off its reaper's growth
            self._net({pid: decode(record) for pid, (record, _) in left.items()}, reaped, records)
            for pid in left:
                self._frozen.pop(pid, None)
                self._exited_ch.pop(pid, None)
            if self.watch is not None:
                self.watch.gone(left)
        owed = self._owed
        self._owed = {pid: [min(a, 0) for a in g] for pid, g in reaped.items() if min(g) < 0}
        for pid, debt in owed.items():  # last poll's shortfall: the reap it read too early
            if pid in reaped and pid in self._seen:
                reaped[pid] = [a + b for a, b in zip(reaped[pid], debt, strict=True)]
        width = self._width + 1  # the counters, and processes started
        attached = self._attached(new)
        for pid, record in new.items():
            row = decode(record)
            born = born_since is not None and row[USAGE_START] >= born_since
            counters = self._first(row, born)
            self._add((row, counters), attached[pid], increments, reaped, record)
            if born_since is not None:  # a process started since the first poll
                increments.setdefault(self._seen[pid].account, [0] * width)[-1] += 1
        for pid, grew in reaped.items():
            if max(grew, default=0) > 0:
                account = increments.setdefault(self._seen[pid].account, [0] * width)
                for (into, _), amount in zip(self._netted, grew, strict=True):
                    account[into[0]] += max(amount, 0)
        self._clock = clock
        self._digests = digests
        if len(stale) > 2 * len(digests) + 64:  # most processes gone: tables of their size
            self._shrink()
        kinds = len(self._shared)  # a kind per live process at most, once those gone go
        if kinds > 2 * min(self._shared_kept, len(self._seen)) + 64:  # kinds gone: let them go
            self._shared = {seen: seen for seen in self._seen.values()}
            self._shared_kept = len(self._shared)
        gauges = {account: list(totals) for account, totals in self._gauges.items()}
        return Tally(gauges, increments, set(self._jids), self._oldest_starts())

    def _oldest_starts(self) -> dict[AccountKey, tuple[int, int]]:
        """(start, fraction) of each account's oldest process, where kept."""
        first: dict[AccountKey, int] = {}
        for account, start in self._starts or ():
            if start < first.get(account, start + 1):
                first[account] = start
        return {account: divmod(start, _FRACTIONS) for account, start in first.items()}

    def _shrink(self) -> None:
        """Copy the tables keyed by process or account: a dict keeps the room of its largest
        size until rebuilt (after 3,000 processes, 144-576 KiB each, for good)."""
        self._records = dict(self._records)
        self._seen = dict(self._seen)
        self._gauges = dict(self._gauges)
        if self._starts is not None:
            self._starts = dict(self._starts)

    def _zombie(self, row: UsageRow) -> bool:
        """Whether ``row``'s process has exited: a zombie, or Linux's dead (being reaped)."""
        return self._state(row[USAGE_STATE]) in _EXITED

    def _counted(self, row: UsageRow) -> list[int] | UsageRow:
        """The counters the tracker takes ``row``'s process to have: a zombie's are frozen."""
        frozen = self._frozen.get(row[USAGE_PID])
        return frozen if frozen is not None else row[USAGE_COUNTERS:]

    def _continued(self, row: UsageRow, base: UsageRow) -> tuple[UsageRow, list[int]]:
        """``row`` and what its process's counters grew by since ``base``: own columns, then
        the children's (a zombie: nothing; its counters freeze at ``base``'s)."""
        before = self._counted(base)
        if self._zombie(row):
            self._frozen.setdefault(row[USAGE_PID], list(before))
            self._exited_ch[row[USAGE_PID]] = row[USAGE_COUNTERS + self._width :]
            return row, [0] * len(before)
        grew = [now - then for now, then in zip(row[USAGE_COUNTERS:], before, strict=True)]
        if min(grew[: self._width], default=0) < 0:  # a quantity of its own went down?
            for columns, weights in self._own:
                if sum(grew[c] * w for c, w in zip(columns, weights, strict=True)) < 0:
                    for c in columns:  # it adds nothing, so takes nothing off the others
                        grew[c] = 0
        return row, grew

    def _first(self, row: UsageRow, born: bool) -> list[int]:
        """What a process first seen adds: all its counters if ``born`` since the last poll,
        else nothing (a baseline). A zombie adds nothing and is taken to have nothing if born
        (its reaper's growth is all it used), else all its row shows."""
        counters = list(row[USAGE_COUNTERS:])
        if self._zombie(row):
            self._frozen[row[USAGE_PID]] = [0] * len(counters) if born else counters
            self._exited_ch[row[USAGE_PID]] = row[USAGE_COUNTERS + self._width :]
            return [0] * len(counters)
        return counters if born else [0] * len(counters)

    def _add(
        self,
        grown: tuple[UsageRow, list[int]],
        attached: Any,
        increments: dict[AccountKey, list[int]],
        reaped: dict[int, list[int]],
        record: bytes,
    ) -> None:
        """Put the process of a row (``record`` decoded) in its account; its own counters'
        growth goes to that account's ``increments``, its children's to ``reaped`` (to be
        netted), and both to the watch, if any."""
        row, grew = grown
        pid = row[USAGE_PID]
        seen = _Seen(attached, self.attribution.key(row, attached))
        seen = self._seen[pid] = self._shared.setdefault(seen, seen)
        self._put(row, seen)
        if self.watch is not None:
            self.watch.put(record, row, grew)
        if not any(grew):
            return  # a baseline, or nothing used: most rows of a first poll
        n = self._width
        account = increments.get(seen.account)
        if account is None:
            account = increments[seen.account] = [0] * (n + 1)  # and processes started
        for i in range(n):
            account[i] += grew[i]
        if any(grew[n:]):  # it reaped (most processes did not: skip the sums)
            reaped[pid] = self._quantities(grew[n:])

    def _quantities(self, columns: list[int] | UsageRow) -> list[int]:
        """The netted quantities of counter ``columns`` (FreeBSD's seconds and microseconds as
        microseconds: a reaper's growth is compared and netted whole, not column by column)."""
        return [sum(columns[i] * w for i, w in zip(*q, strict=True)) for q in self._netted]

    def _net(
        self,
        gone: dict[int, UsageRow],
        reaped: dict[int, list[int]],
        current: Sequence[bytes],
    ) -> None:
        """Take each gone process's counted totals (own plus children's) off the children's
        growth of the process that reaped it: its parent, if alive. Else (its parent gone or a
        zombie now) the nearest ancestor whose growth holds them whole: the one its parent
        reaped it through, or one its parent's exit gave it to (init, a subreaper). A zombie
        holds what it reaped after its last live poll (its children's usage since), and what
        is taken off it waits in its frozen children's, for its own reaper to take off in turn.
        Where a reaper is left short, the rest comes off its ancestors' growth, nearest first.
        """
        n, hops = self._width, len(current) + len(gone)  # hops: a pid loop cannot hang it
        parents: dict[int, int] = {}

        def parent(pid: int) -> int | None:
            if not parents:  # only orphans and short reapers need the live processes' parents
                parents.update((r[USAGE_PID], r[USAGE_PPID]) for r in map(self.decode, current))
            return parents.get(pid)

        def holds(pid: int, totals: list[int]) -> bool:
            frozen = self._frozen.get(pid)
            if frozen is None:
                grew = reaped.get(pid)
                return grew is not None and all(map(int.__ge__, grew, totals))
            since = [a - b for a, b in zip(self._exited_ch[pid], frozen[n:], strict=True)]
            return all(map(int.__ge__, self._quantities(since), totals))

        def take(pid: int, totals: list[int]) -> None:
            frozen = self._frozen.get(pid)
            for k, amount in enumerate(totals):
                if frozen is None:
                    reaped.setdefault(pid, [0] * len(totals))[k] -= amount
                else:  # its finest column: weight 1
                    frozen[n + self._netted[k][0][0]] += amount

        orphans: list[tuple[int, list[int]]] = []
        for row in gone.values():
            counted = self._counted(row)
            totals = self._quantities([counted[i] + counted[n + i] for i in range(n)])
            ancestor, walked = row[USAGE_PPID], 0
            while ancestor in gone and walked < hops:
                ancestor, walked = gone[ancestor][USAGE_PPID], walked + 1
            if not any(totals) or ancestor not in self._seen:
                continue  # nothing counted, or its reaper is out of sight (ppid 0, hidden)
            if ancestor == row[USAGE_PPID] and ancestor not in self._frozen:
                take(ancestor, totals)  # its live parent: only it can have reaped it
            else:
                orphans.append((ancestor, totals))
        for ancestor, totals in orphans:
            reaper: int | None = ancestor
            for _ in range(hops):
                if reaper is None or holds(reaper, totals):
                    break
                reaper = parent(reaper)
            take(ancestor if reaper is None else reaper, totals)
        for pid in [pid for pid, grew in reaped.items() if min(grew) < 0]:
            grew, ancestor = reaped[pid], parent(pid)
            for _ in range(hops):
                if ancestor is None or min(grew) >= 0:
                    break
                above = reaped.get(ancestor, grew)
                for i, amount in enumerate(grew):
                    if amount < 0 < above[i]:
                        moved = min(-amount, above[i])
                        above[i] -= moved
                        grew[i] += moved
                ancestor = parent(ancestor)

    def _attached(self, new: dict[int, bytes]) -> dict[int, Any]:
        """What :attr:`Attribution.attach` gives each new process, by pid. Processes seen
        before are all back in ``_seen`` by now, those whose record changed included."""
        attach = self.attribution.attach
        if attach is None or not new:
            return dict.fromkeys(new)

        def earlier(pid: int) -> Any:
            seen = self._seen.get(pid)
            return None if seen is None else seen.attached

        return attach(new, earlier)

    def _put(self, row: UsageRow, seen: _Seen) -> None:
        totals = self._gauges.get(seen.account)
        if totals is None:
            totals = self._gauges[seen.account] = [0, 0, 0, 0]
        totals[0] += 1
        totals[1] += row[USAGE_RSS_PAGES]
        totals[2] += row[USAGE_VSIZE]
        totals[3] += max(row[USAGE_THREADS], 1)
        jid = row[USAGE_JID]
        self._jids[jid] = self._jids.get(jid, 0) + 1
        if self._starts is not None and seen.account is not None:
            key = (seen.account, _start(row))
            self._starts[key] = self._starts.get(key, 0) + 1

    def _take(self, row: UsageRow, seen: _Seen) -> None:
        totals = self._gauges[seen.account]
        totals[0] -= 1
        totals[1] -= row[USAGE_RSS_PAGES]
        totals[2] -= row[USAGE_VSIZE]
        totals[3] -= max(row[USAGE_THREADS], 1)
        if totals[0] == 0:
            del self._gauges[seen.account]
        jid = row[USAGE_JID]
        self._jids[jid] -= 1
        if self._jids[jid] == 0:
            del self._jids[jid]
        if self._starts is not None and seen.account is not None:
            key = (seen.account, _start(row))
            self._starts[key] -= 1
            if self._starts[key] == 0:
                del self._starts[key]

    def account(self, pid: int) -> AccountKey | None:
        """The account of process ``pid`` as of the last update; None if it had none or was
        not there."""
        seen = self._seen.get(pid)
        return None if seen is None else seen.account

    def __len__(self) -> int:
        return len(self._seen)


class Resources(NamedTuple):
    """What one poll says each series consumes; immutable once made."""

    labels: tuple[str, ...]
    processes: dict[Key, int]
    resident_bytes: dict[Key, int]
    virtual_bytes: dict[Key, int]
    counters: dict[tuple[str, str], dict[Key, float]]
    """Per (metric, label value) of :attr:`UsageSpec.counters`: the series' totals."""
    folded: int
    """Series folded into ``other`` to stay under the cap."""
    jails: dict[int, str]
    """Name of every jail with a process (jid 0 included)."""


IDLE_KEPT = 10
"""Idle series kept, per series of the cap."""


STARTED = ("processes_started", "")
"""The counter column of processes first seen after the first poll (:attr:`Tally.increments`'
last)."""


class Accounts:
    """Series-level counters: named, folded under the cap, never going down.

    A series that has been seen stays, after its last process is gone, with no processes and
    its counters at their totals (process-exporter's ``num_procs 0``, the usual "service down"
    alert, and the last increments within reach of ``increase()``), as long as the cap leaves
    room beside the live series: the series idle longest go first, never a live one. Each
    series keeps its total while it is folded or idle, so when it returns it goes on from where
    it was; of idle series, the :data:`IDLE_KEPT` times ``max_accounts`` most recently live are
    remembered (memory stays bounded). One idle for longer starts again from 0, which
    Prometheus takes for a counter reset: no spike, its rate stays right.
    """

    def __init__(self, labels: tuple[str, ...], max_accounts: int, spec: UsageSpec) -> None:
        self.labels = labels
        self.max_accounts = max(max_accounts, 1)
        self.spec = spec
        self._columns = list(dict.fromkeys((m, v) for m, v, _ in spec.counters)) + [STARTED]
        self._totals: dict[Key, dict[tuple[str, str], float]] = {}
        """Every series seen and not forgotten, live or idle: its counters' totals."""
        self._idle: dict[Key, int] = {}
        """Series with no processes: the poll number they went idle."""
        self._polls = 0

    def add(self, tally: Tally, name: Callable[[AccountKey], Key]) -> Resources:
        """This poll's series from a :class:`Tracker` tally; ``name`` labels an account."""
        self._polls += 1
        named: dict[Key, list[int]] = {}
        key_of: dict[AccountKey, Key] = {}
        for account, (procs, rss, vsize, _) in tally.gauges.items():
            key = key_of[account] = name(account)
            totals = named.setdefault(key, [0, 0, 0])  # two uids may share a name
            totals[0] += procs
            totals[1] += rss
            totals[2] += vsize
        kept = sorted(named, key=lambda k: (-named[k][0], k))[: self.max_accounts]
        if len(named) > self.max_accounts:
            kept = kept[: self.max_accounts - 1]  # one place for other
        fold = set(named) - set(kept)
        other = (OTHER,) * len(self.labels)
        series: dict[Key, list[int]] = {k: named[k] for k in kept}
        if fold:
            series[other] = [sum(named[k][i] for k in fold) for i in range(3)]
        for account, grew in tally.increments.items():
            key = key_of.get(account) or name(account)
            self._grow(other if key in fold or key not in series else key, grew)
        for key in series:
            self._totals.setdefault(key, {})
        self._forget(named, series)
        room = max(self.max_accounts - len(series), 0)
        idle = (  # the most recently live first
            heapq.nsmallest(room, self._idle, key=lambda k: (-self._idle[k], k))
            if len(self._idle) > room
            else self._idle
        )
        series.update((key, [0, 0, 0]) for key in idle if key not in series)
        page = self.spec.page_size
        return Resources(
            labels=self.labels,
            processes={k: v[0] for k, v in series.items()},
            resident_bytes={k: v[1] * page for k, v in series.items()},
            virtual_bytes={k: v[2] for k, v in series.items()},
            counters={
                column: {k: self._totals[k].get(column, 0.0) for k in series}
                for column in self._columns
            },
            folded=len(fold),
            jails={},
        )

    def _grow(self, key: Key, grew: list[int]) -> None:
        """Add an account's increments to series ``key``; a metric whose sum would go down (a
        counter the kernel reset) adds nothing."""
        step: dict[tuple[str, str], float] = {STARTED: float(grew[-1])}
        for (metric, value, scale), amount in zip(self.spec.counters, grew, strict=False):
            if amount:
                step[metric, value] = step.get((metric, value), 0.0) + amount * scale
        totals = self._totals.setdefault(key, {})
        for column, seconds_or_events in step.items():
            if seconds_or_events > 0:
                totals[column] = totals.get(column, 0.0) + seconds_or_events

    def _forget(self, live: dict[Key, list[int]], served: dict[Key, list[int]]) -> None:
        """Mark the series with no process idle (a folded account is live: its processes are
        in ``other``), and keep the IDLE_KEPT * max_accounts most recently live of them."""
        for key in served:
            self._idle.pop(key, None)
        for key in self._totals:
            if key not in live and key not in served:
                self._idle.setdefault(key, self._polls)
            elif key in live:
                self._idle.pop(key, None)
        while len(self._idle) > IDLE_KEPT * self.max_accounts:
            oldest = min(self._idle, key=self._idle.__getitem__)
            del self._idle[oldest], self._totals[oldest]


def _per_pid(read: Callable[[int], Any]) -> Callable[[dict[int, bytes], Any], dict[int, Any]]:
    """A :attr:`Attribution.attach` that reads each new process by its pid."""
    return lambda new, _: {pid: read(pid) for pid in new}


class Accounting:
    """Resources per account (one value of each of ``labels``) of one source: a tracker, its
    accounts and the naming."""

    def __init__(
        self,
        source: Source,
        labels: tuple[str, ...],
        max_series: int,
        spec: UsageSpec,
        top: TopConfig | None = None,
    ) -> None:
        self.source = source
        self.max_series = max_series
        self.top = top
        cgroup: Callable[[int], str] | None = getattr(source, "cgroup", None)
        if "cgroup" in labels and cgroup is None:
            raise SourceError(f"resources.labels 'cgroup' needs cgroups: {source.name} has none")
        raw: list[Callable[[UsageRow, Any], Any]] = [
            {
                "user": lambda row, _: row[USAGE_UID],
                "jail": lambda row, _: row[USAGE_JID],
                "cgroup": lambda _, attached: attached,
            }[label]
            for label in labels
        ]
        attach = _per_pid(cgroup) if cgroup is not None and "cgroup" in labels else None
        attribution = Attribution(lambda row, a: tuple(f(row, a) for f in raw), attach)
        watch = None if top is None else Watch(top.n, top.by, spec)
        self.tracker = Tracker(attribution, spec, watch=watch)
        self._chosen: list[tuple[UsageRow, Key]] = []
        """The top sets of the last poll: each process's row and its account's label values."""
        # A metric with two values per account (cpu user/system) keeps within the series cap.
        self.accounts = Accounts(labels, max_series // 2, spec)

    def poll(self, survey: Survey, user_name: Callable[[int], str]) -> Resources:
        tally = self.tracker.update(survey.usage, survey.clock)
        jails = {jid: self.source.jail_name(jid) for jid in tally.jids}
        by_label: dict[str, Callable[[Any], str]] = {
            "user": user_name,
            "jail": jails.__getitem__,
            "cgroup": str,
        }
        namers = [by_label[label] for label in self.accounts.labels]

        def name(account: AccountKey) -> Key:
            assert isinstance(account, tuple)
            return tuple(f(v) for f, v in zip(namers, account, strict=True))

        out = self.accounts.add(tally, name)
        if self.tracker.watch is not None:
            account = self.tracker.account
            self._chosen = [(r, name(account(r[USAGE_PID]))) for r in self.tracker.watch.rank()]
        return out._replace(jails=jails)

    def top_processes(self, group_of: Callable[[int], str | None] | None) -> TopProcesses:
        """The last poll's top sets (``top`` on): labelled by the account's labels, the named
        group (``group_of``, where named groups are on) and the command line (``top.cmdline``:
        read only for these processes)."""
        watch, top = self.tracker.watch, self.top
        assert watch is not None and top is not None
        labels = ("pid", "comm", *self.accounts.labels)
        chosen = self._chosen
        if group_of is not None:
            labels += ("group",)
            chosen = [(row, (*key, group_of(row[USAGE_PID]) or "")) for row, key in chosen]
        if top.cmdline:
            labels += ("cmdline",)
            argv = self.source.argv
            chosen = [(row, (*key, watch.cmdline(row, argv, top.cmdline))) for row, key in chosen]
        return TopProcesses(labels, report(chosen, self.accounts.spec))


def accounting_for(
    current: Accounting | None,
    source: Source,
    labels: tuple[str, ...] | None,
    max_series: int,
    top: TopConfig | None = None,
) -> Accounting | None:
    """``current`` if it still fits ``source`` and the settings, else a new accounting (its
    counters start afresh: Prometheus sees a counter reset); None where no resources are
    asked for (``labels`` None)."""
    if labels is None:
        return None
    if (
        current is not None
        and current.source is source
        and current.accounts.labels == labels
        and current.max_series == max_series
        and current.top == top
    ):
        return current
    return Accounting(source, labels, max_series, source.usage_spec, top)
