"""The records every source returns and the interface every source implements.

A source (``sources/procfs.py`` on Linux, ``sources/libkvm.py`` on FreeBSD) turns
platform data into these plain immutable records; nothing platform-specific passes
this boundary.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from operator import itemgetter
from typing import NamedTuple, Protocol

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


Kind = tuple[int, str, str, int]
"""What the metrics see of a process: (effective uid, tty, state, threads)."""

Census = dict[Kind, int]
"""How many processes there are of each :data:`Kind`."""

_KIND = itemgetter(*(Proc._fields.index(f) for f in ("uid", "tty", "state", "threads")))


def census_of(procs: Iterable[Proc]) -> Census:
    """Count ``procs`` per kind, in one pass at C speed (itemgetter, Counter)."""
    return Counter(map(_KIND, procs))


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

    def loadavg(self) -> LoadAvg: ...

    def swap(self) -> list[SwapDevice]: ...

    def limits(self) -> HostLimits: ...

    def close(self) -> None: ...
