"""The records every source returns and the interface every source implements.

A source (``sources/procfs.py`` on Linux, ``sources/libkvm.py`` on FreeBSD) turns
platform data into these plain immutable records; nothing platform-specific passes
this boundary.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from operator import eq, itemgetter
from typing import Any, NamedTuple, Protocol, overload

NO_TTY = "none"
"""The ``tty`` of a process without a controlling terminal (ps shows ``?`` or ``-``)."""

UNKNOWN_TTY = "unknown"
"""The ``tty`` of a process whose terminal the source cannot name (from a FreeBSD crash dump)."""


class Proc(NamedTuple):
    """One process, as of the moment it was read."""

    pid: int
    ppid: int
    uid: int
    """Effective uid: the one ``ps -o uid`` shows."""
    ruid: int
    """Real uid."""
    tty: str
    """Controlling terminal as ``ps`` names it (``pts/3``, ``ttyv0``), or :data:`NO_TTY`."""
    state: str
    """A word of :data:`kvm_exporter.states.STATES`."""
    comm: str
    threads: int
    rss_bytes: int
    vsize_bytes: int
    cpu_seconds: float
    start_time: float | None
    """Start time, seconds since the Unix epoch; None where the source cannot know it."""
    jid: int = 0
    """Jail id (FreeBSD ``ki_jid``; 0: none, or the reader's own jail); 0 on Linux."""


ARGV_BYTES = 4096
"""Most bytes of a process's arguments a source reads (kvm_getargv's ``nchr``); the rest of
a longer command line is cut, its last argument truncated."""


def split_argv(data: bytes) -> tuple[str, ...]:
    """Arguments from NUL-separated bytes (``/proc/PID/cmdline``): a trailing NUL ends the
    last one; bytes that are not UTF-8 are kept as lone surrogates."""
    if not data:
        return ()
    return tuple(a.decode("utf-8", "surrogateescape") for a in data.rstrip(b"\0").split(b"\0"))


Kind = tuple[int, str, str, int, int]
"""What the metrics see of a process: (effective uid, tty, state, threads, jail id)."""

Census = dict[Kind, int]
"""How many processes there are of each :data:`Kind`."""

_KIND = itemgetter(*(Proc._fields.index(f) for f in ("uid", "tty", "state", "threads", "jid")))


def census_of(procs: Iterable[Proc]) -> Census:
    """Count ``procs`` per kind, in one pass at C speed (itemgetter, Counter)."""
    return Counter(map(_KIND, procs))


UsageRow = tuple[Any, ...]
"""What one process is and has consumed, as of the read: integers in the source's own units
(and its comm as bytes), laid out as the ``USAGE_*`` indexes say; the counters follow from
:data:`USAGE_COUNTERS` on. A survey carries each as its packed bytes (a *usage record*),
decoded by :attr:`UsageSpec.decode` only where it changed since the last poll."""

USAGE_PID, USAGE_START, USAGE_START_FRACTION, USAGE_UID, USAGE_JID = range(5)
"""Identity (pid and start time, in the units of :attr:`Survey.clock`; a fraction of that
unit where the source has one, else 0), effective uid and jail id (0: the reader's own)."""
USAGE_RSS_PAGES, USAGE_VSIZE = 5, 6
"""Resident pages and virtual bytes: gauges."""
USAGE_PPID, USAGE_THREADS, USAGE_STATE, USAGE_COMM = 7, 8, 9, 10
"""Parent pid, threads, the state as the source codes it (:attr:`UsageSpec.state` names it)
and comm (NUL-padded bytes): what named groups need of a process."""
USAGE_COUNTERS = 11
"""Where the cumulative counters start; :attr:`UsageSpec.counters` names each of them. They
come twice, column for column: first what the process itself used, then what its reaped
children used (the kernel's children's usage, which grows when the process reaps a child by
that child's own usage plus its children's: Linux ``cutime``..., FreeBSD ``ki_rusage_ch``)."""


def comm_of(field: bytes) -> str:
    """A NUL-padded comm field of a usage row as text; bytes that are not UTF-8 are kept as
    lone surrogates (a name shows each as ``\\xNN``: two such comms stay two groups)."""
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


class UsageSpec(NamedTuple):
    """How to read a source's usage rows."""

    page_size: int
    counters: tuple[tuple[str, str, float], ...]
    """(metric, label value, seconds or events per unit) of each counter column in order.
    Columns with the same metric and value add up (FreeBSD's seconds and microseconds). A row
    holds them twice: its own usage, then its reaped children's (:data:`USAGE_COUNTERS`)."""
    decode: Callable[[bytes], UsageRow]
    """A usage record's row."""
    state: Callable[[int], str]
    """The state word (:data:`kvm_exporter.states.STATES`) of a row's state code."""
    start_time: Callable[[int, int], float | None]
    """Seconds since the epoch of a row's (start, fraction); None where the source has no
    start times (a crash dump)."""
    reaped: frozenset[str] | None = None
    """The counter metrics whose reaped children's usage the kernel reports (None: all): the
    children's columns of the others stay 0 (FreeBSD fills only ``ki_rusage_ch``'s times)."""


class Digests(Protocol):
    """One poll's usage records as digests (equal records, equal digests), set against the
    last poll's to find what changed."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[int]:
        """The digests in record order."""
        ...

    def digest(self, at: int) -> int:
        """The digest of the record at position ``at``."""
        ...

    def members(self) -> set[int]:
        """Every digest, as a set."""
        ...

    def changes(self, last: Digests | None) -> tuple[list[int], list[int]]:
        """The positions of the records not in ``last`` (new or changed since), and the
        digests of ``last``'s records not here (changed or gone)."""
        ...


def changes_by_sets(digests: Digests, last: Digests | None) -> tuple[list[int], list[int]]:
    """:meth:`Digests.changes` by Python sets: for any two kinds of digests."""
    here, before = digests.members(), set() if last is None else last.members()
    fresh = here - before
    positions = [at for at, digest in enumerate(digests) if digest in fresh] if fresh else []
    return positions, list(before - here)


class Hashes:
    """:class:`Digests` by Python's own hash of each record's bytes: where no compiled
    digests are, or two records had one."""

    def __init__(self, records: Iterable[bytes]) -> None:
        self._order = list(map(hash, records))
        self._set = set(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[int]:
        return iter(self._order)

    def digest(self, at: int) -> int:
        return self._order[at]

    def members(self) -> set[int]:
        return self._set

    def changes(self, last: Digests | None) -> tuple[list[int], list[int]]:
        return changes_by_sets(self, last)


class Records(Sequence[bytes]):
    """A survey's usage records side by side in one buffer, each ``size`` bytes, ``stride``
    apart, made bytes only when asked for: a steady poll looks at the few that changed, found
    by their :attr:`digests` (compiled ones; else the bytes' hashes)."""

    def __init__(self, buffer: Any, stride: int, size: int, count: int, digests: Digests | None):
        self._view = memoryview(buffer).cast("B")
        self._stride, self._size, self._count = stride, size, count
        self.digests: Digests = Hashes(self) if digests is None else digests
        self._made: list[bytes | None] = []
        """Each record's bytes once made, by index: the trackers that keep a record (the
        resources' and the named groups') share one copy. A 3,000-process burst made two,
        0.7 MiB more at its peak, and the Python heap a burst grows stays grown (issue 23)."""

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> bytes: ...

    @overload
    def __getitem__(self, index: slice) -> list[bytes]: ...

    def __getitem__(self, index: int | slice) -> bytes | list[bytes]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        index %= len(self)
        if not self._made:
            self._made = [None] * len(self)
        record = self._made[index]
        if record is None:
            at = index * self._stride
            record = self._made[index] = bytes(self._view[at : at + self._size])
        return record

    def __iter__(self) -> Iterator[bytes]:
        layout = struct.Struct(f"{self._size}s{self._stride - self._size}x")
        return map(itemgetter(0), layout.iter_unpack(self._view[: len(self) * self._stride]))

    def __eq__(self, other: object) -> bool:
        """Equal to any sequence of the same records (as a list of them is)."""
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(map(eq, self, other))

    __hash__ = None  # type: ignore[assignment]  # equal by content, and a view of a buffer


class Survey(NamedTuple):
    """One read of every process: the census, and each process's usage row."""

    census: Census
    usage: Sequence[bytes]
    """One usage record per process (see :data:`UsageRow`); :class:`Records` where the
    compiled loops gave them digests."""
    clock: int
    """When the read began, in the units of a row's start: a process whose start is at or
    after it was born during or after the read."""


DETAILS = ("io", "fd", "status", "smaps")
"""What a source can read of a process beyond its usage record, each at the cost of more
reads per process (``groups.details``): storage bytes read and written; open descriptors
and their soft limit; swapped memory and context switches; proportional memory."""

DETAIL_FILES = {
    "io": ("io",),
    "fd": ("fd", "limits"),
    "status": ("status",),
    "smaps": ("smaps_rollup",),
}
"""The files of ``/proc/PID`` each detail reads on Linux (:attr:`Details.refused` names them)."""


class Details(NamedTuple):
    """What the detail reads gave of one process; a value not asked for, or not read, is 0."""

    read_bytes: int = 0
    write_bytes: int = 0
    """Storage I/O, as the block layer saw it (Linux ``PID/io`` read_bytes, write_bytes)."""
    open_fds: int = 0
    fd_ratio: float = 0.0
    """Open descriptors over the soft limit on them (0: unlimited, or not read)."""
    swap_bytes: int = 0
    voluntary_switches: int = 0
    involuntary_switches: int = 0
    """Summed over the process's live threads (Linux ``status`` counts one thread's own)."""
    proportional_bytes: int = 0
    proportional_swap_bytes: int = 0
    """Resident and swapped memory, each page shared by N processes counted 1/N."""
    refused: tuple[str, ...] = ()
    """The files the kernel would not let this reader read (not those of a process gone)."""


class LoadAvg(NamedTuple):
    load1: float
    load5: float
    load15: float


class SwapDevice(NamedTuple):
    device: str
    size_bytes: int
    used_bytes: int


class HostLimits(NamedTuple):
    cpus: int
    max_procs: int
    """Most processes the kernel allows (``kern.maxproc``; Linux: the task limit)."""
    max_threads: int
    """Most threads the kernel allows (``kern.maxthread``; Linux: the task limit, the lower of
    ``pid_max - 1`` and ``threads-max``, as every thread takes a PID)."""
    memory_bytes: int | None = None
    """Physical memory (``hw.physmem``, ``MemTotal``); None where the source cannot tell."""
    pid_max: int | None = None
    """Linux's ``kernel.pid_max`` as is (node_exporter's ``node_processes_max_processes``);
    None elsewhere."""
    threads_max: int | None = None
    """Linux's ``kernel.threads-max`` as is (node_exporter's ``node_processes_max_threads``);
    None elsewhere."""


class HostUsage(NamedTuple):
    """The host's own counters, beside which the accounts' add up (or say what they miss)."""

    cpu_seconds: dict[str, float]
    """CPU time since boot per mode, in node_exporter's words (``user``, ``nice``, ``system``,
    ``idle``, Linux also ``iowait``, ``irq``, ``softirq``, ``steal``; FreeBSD ``interrupt``)."""
    page_faults: dict[str, int]
    """Page faults since boot, ``minor`` and ``major``, where the kernel counts them."""
    forks: int | None
    """Processes created since boot; None where the source cannot tell."""


class OwnUsage(NamedTuple):
    """What the exporter's own process uses, for the ``process_*`` metrics."""

    cpu_seconds: float
    resident_bytes: int
    virtual_bytes: int
    start_time: float
    """Seconds since the Unix epoch."""
    open_fds: int | None
    """None where the system cannot say."""
    max_fds: int


HOST_JAIL = "host"
"""The ``jail`` of processes outside any jail (jid 0: from inside a jail, the reader's own)."""


class SourceError(Exception):
    """A source could not read what was asked; the message says what and why."""


class Source(Protocol):
    """What the poller needs from a platform. Implementations may raise :class:`SourceError`."""

    name: str
    states: tuple[str, ...]
    """The states this source can tell apart; each is reported, as 0 if no process has it."""

    def procs(self) -> list[Proc]:
        """Every process, each with all its fields."""
        ...

    def census(self) -> Census:
        """Processes counted per kind: what a poll needs, which may cost less to read."""
        ...

    def argv(self, pid: int) -> tuple[str, ...] | None:
        """The arguments of the process ``pid`` now is, up to :data:`ARGV_BYTES`; None if they
        cannot be read (gone, not permitted; on FreeBSD a kernel process, or a zombie whose
        arguments the kernel did not cache: a zombie keeps its cached ones until reaped)."""
        ...

    def survey(self) -> Survey:
        """The census and every process's usage row, from one read."""
        ...

    usage_spec: UsageSpec
    """What :meth:`survey` rows hold."""

    def jail_name(self, jid: int) -> str:
        """The name of jail ``jid`` as the reader sees it (``host`` for 0)."""
        ...

    def visibility(self) -> dict[str, bool]:
        """Each kernel restriction checked (``kvm_exporter.visibility``): whether it hides
        processes from this reader; one that cannot be told is left out."""
        ...

    def loadavg(self) -> LoadAvg: ...

    def swap(self) -> list[SwapDevice]: ...

    def limits(self) -> HostLimits: ...

    def host_usage(self) -> HostUsage:
        """The host's CPU time, page faults and forks since boot."""
        ...

    def close(self) -> None: ...
