"""The Linux source: processes, load and swap from ``/proc``.

A poll takes the census: per process one read of ``/proc/PID/stat`` (state, tty, threads) and
one ``stat()`` of the directory ``/proc/PID``, whose owner is the effective uid, the one ``ps``
shows (since Linux 4.11 also for a non-dumpable process; the *files* inside the directory then
belong to root). It runs in C when the optional ``_procscan`` extension was built at install,
else in Python. ``procs()`` gives full records and reads ``/proc/PID/status`` too, the only
place with the real uid, which about doubles the kernel's work per process (named groups ask
for records without it).
"""

from __future__ import annotations

import os
import re
import stat as statmod
import struct
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, TypeVar

from .. import visibility
from ..records import (
    ARGV_BYTES,
    DETAIL_FILES,
    HOST_JAIL,
    NO_TTY,
    Census,
    Details,
    HostLimits,
    HostUsage,
    LoadAvg,
    Proc,
    SourceError,
    Survey,
    SwapDevice,
    UsageSpec,
    split_argv,
)
from ..states import LINUX_STATES, STATES
from . import digests

try:
    from ._procscan import ffi as _ffi  # type: ignore[import-not-found, unused-ignore]
    from ._procscan import lib as _lib  # type: ignore[import-not-found, unused-ignore]

    _new_uncleared = _ffi.new_allocator(should_clear_after_alloc=False)
    """C memory that only the rows written are resident of."""
except ImportError:  # built only where pip found a C compiler and Python's headers
    _ffi = _lib = _new_uncleared = None

T = TypeVar("T")
RawKind = tuple[tuple[int, int, bytes, int], int]
"""((uid, tty_nr, state letter, threads), count), as both census scans give them."""

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_VANISHED = (FileNotFoundError, ProcessLookupError)
_OCTAL = re.compile(rb"\\([0-3][0-7]{2})")
_READ_SIZE = 4096  # stat is ~300 bytes, status ~1.5 KiB; the uid lines are in the first 300
_STAT_FIELDS = 22  # split no further than rss, the last field read
_CENSUS_FIELDS = 18  # split no further than num_threads
_USAGE_FIELDS = 22  # split no further than rss
_USAGE_ROW = struct.Struct("=qQQqqqQqqq64sQQQQQQQQ")
"""struct kvm_usage_row of _procscan: the layout of a usage record (records.USAGE_*)."""
_STATE_OF = {letter.encode(): state for letter, state in LINUX_STATES.items()}
_STATE_OF_CODE = {ord(letter): state for letter, state in _STATE_OF.items()}
_CPU_MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
"""The first columns of stat's ``cpu`` line, in node_exporter's words."""
_USAGE_COUNTERS = (
    ("cpu", "user", 1 / _CLK_TCK),
    ("cpu", "system", 1 / _CLK_TCK),
    ("page_faults", "minor", 1.0),
    ("page_faults", "major", 1.0),
)
"""utime and stime in clock ticks, minflt and majflt of PID/stat; a row holds them, then the
same of the reaped children: cutime, cstime, cminflt, cmajflt."""


def _read(path: str, dir_fd: int | None = None, size: int = 16384) -> bytes:
    """One read of ``path`` (relative to ``dir_fd`` if given): procfs files come whole."""
    fd = os.open(path, os.O_RDONLY, dir_fd=dir_fd)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


def _read_lines(path: str) -> list[bytes]:
    """The non-empty lines of ``path``, which may be longer than one read (``stat`` has a
    line per CPU)."""
    try:
        with open(path, "rb") as file:
            return [line for line in file.read().splitlines() if line.strip()]
    except OSError as err:
        raise SourceError(f"cannot read {path}: {err.strerror}") from None


def _read_text(path: str) -> str:
    try:
        return _read(path).decode("ascii", "replace")
    except OSError as err:
        raise SourceError(f"cannot read {path}: {err.strerror}") from None


def _read_int(path: str) -> int:
    text = _read_text(path)
    try:
        return int(text)
    except ValueError:
        raise SourceError(f"{path}: expected an integer, got {text[:40]!r}") from None


def tty_name(tty_nr: int, dev_names: dict[int, str]) -> str:
    """Name a ``tty_nr`` of ``/proc/PID/stat`` the way ``ps`` does (``pts/3``, ``tty1``)."""
    if tty_nr == 0:
        return NO_TTY
    major = (tty_nr >> 8) & 0xFFF
    minor = (tty_nr & 0xFF) | ((tty_nr >> 12) & 0xFFF00)
    if 136 <= major <= 143:  # Unix98 pseudo-terminals span eight majors
        return f"pts/{minor + (major - 136) * 256}"
    if major == 4:
        return f"tty{minor}" if minor < 64 else f"ttyS{minor - 64}"
    name = dev_names.get(os.makedev(major, minor))
    return name if name is not None else f"{major}:{minor}"


def dev_char_names(dev: str = "/dev") -> dict[int, str]:
    """Map device numbers of the character devices directly in ``dev`` to their names."""
    names: dict[int, str] = {}
    try:
        entries = list(os.scandir(dev))
    except OSError:
        return names
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if statmod.S_ISCHR(st.st_mode):
            names.setdefault(st.st_rdev, entry.name)
    return names


def parse_stat(data: bytes, maxsplit: int = -1) -> tuple[str, list[bytes]]:
    """Split ``/proc/PID/stat`` into comm and the fields after it (state first).

    comm is whatever the process named itself and may hold spaces, parentheses or
    newlines, so it ends at the *last* ``)``. With ``maxsplit``, the last field holds the rest.
    """
    start, end = data.index(b"("), data.rindex(b")")
    return data[start + 1 : end].decode("utf-8", "replace"), data[end + 2 :].split(None, maxsplit)


def _status_uids(data: bytes) -> tuple[int, int]:
    """(real, effective) uid from ``/proc/PID/status``."""
    at = data.index(b"\nUid:") + 5
    ruid, uid = data[at : at + 48].split(None, 2)[:2]  # two 10-digit uids fit in 48 bytes
    return int(ruid), int(uid)


def _usage_record(pid: int, uid: int, comm: bytes, f: list[bytes]) -> bytes:
    """The usage record of process ``pid`` from its comm and the fields of its PID/stat after
    comm, as ``_procscan`` makes it."""
    fields = (int(f[19]), 0, uid, 0, int(f[21]), int(f[20]), int(f[1]), int(f[17]), f[0][0])
    own = (int(f[11]), int(f[12]), int(f[7]), int(f[9]))
    children = (int(f[13]), int(f[14]), int(f[8]), int(f[10]))
    return _USAGE_ROW.pack(pid, *fields, comm[:63], *own, *children)


def _live_thread(dir_fd: int, pid: str, f: list[bytes]) -> None:
    """A process whose first thread exited while others run (``pthread_exit`` in main): its
    PID/stat is that thread's, a zombie with no memory. Take state, vsize and rss into the
    fields ``f`` from its first live thread's; PID/stat's counters are the whole group's."""
    try:
        task = os.open(f"{pid}/task", os.O_RDONLY | os.O_DIRECTORY, dir_fd=dir_fd)
    except OSError:
        return  # gone, or not ours to read: the zombie row stands
    try:
        tids = [tid for tid in os.listdir(task) if tid != pid]
    except OSError:
        return
    finally:
        os.close(task)
    for tid in tids:
        try:
            data = _read(f"{pid}/task/{tid}/stat", dir_fd, _READ_SIZE)
        except OSError:
            continue
        thread = data[data.rindex(b")") + 2 :].split(None, _USAGE_FIELDS)
        if thread[0] not in (b"Z", b"X"):
            f[0], f[20], f[21] = thread[0], thread[20], thread[21]
            return


def _census_py(dir_fd: int, usage: list[bytes] | None = None) -> list[RawKind]:
    """The census in Python: the same reads as ``_procscan``'s C, counted by a Counter."""
    kinds: list[tuple[int, bytes, bytes, bytes]] = []
    append, read, stat = kinds.append, _read, os.stat  # locals: the loop runs per pid
    fields = _CENSUS_FIELDS if usage is None else _USAGE_FIELDS
    for pid in os.listdir(dir_fd):
        if not pid.isdigit():
            continue
        try:
            data = read(pid + "/stat", dir_fd, _READ_SIZE)
            uid = stat(pid, dir_fd=dir_fd).st_uid
        except _VANISHED:
            continue  # exited between listdir and read
        if not data:
            continue  # a pid being reaped can read as empty
        end = data.rindex(b")")
        f = data[end + 2 :].split(None, fields)
        if f[0] == b"Z" and f[17] != b"1":
            _live_thread(dir_fd, pid, f)
        append((uid, f[4], f[0], f[17]))
        if usage is not None:
            usage.append(_usage_record(int(pid), uid, data[data.index(b"(") + 1 : end], f))
    return [
        ((uid, int(tty), letter, int(n)), c) for (uid, tty, letter, n), c in Counter(kinds).items()
    ]


def _fields(data: bytes, names: dict[bytes, str], scale: int = 1) -> dict[str, int]:
    """The values of the lines of ``data`` that start with a key of ``names`` (``key:``
    then a number), as ``names`` calls them, times ``scale``; a missing line gives 0 (a
    kernel thread has no ``VmSwap``). Found by search, not line by line: ``status`` has
    some 60 lines, of which a poll wants three."""
    text = b"\n" + data
    found = {}
    for key, name in names.items():
        at = text.find(b"\n" + key + b":")
        found[name] = 0 if at < 0 else int(text[at + len(key) + 2 :].split(None, 1)[0]) * scale
    return found


def _io(_: Any, base: str) -> dict[str, int]:
    return _fields(_read(base + "io"), {b"read_bytes": "read_bytes", b"write_bytes": "write_bytes"})


_SWITCHES = {
    b"voluntary_ctxt_switches": "voluntary_switches",
    b"nonvoluntary_ctxt_switches": "involuntary_switches",
}
"""The context switch lines of ``status``: each thread's own (the kernel's per-task counts)."""


def _status(_: Any, base: str) -> dict[str, int]:
    """Swapped memory and context switches; those of a process of two or more threads summed
    over its live threads' ``task/TID/status``, as process-exporter sums them (its default
    ``-threads``): ``status`` counts one thread's own only."""
    data = _read(base + "status")
    found = _fields(data, {b"VmSwap": "swap_bytes"}, 1024)
    if _fields(data, {b"Threads": "threads"})["threads"] < 2:
        return found | _fields(data, _SWITCHES)
    found |= dict.fromkeys(_SWITCHES.values(), 0)
    for tid in os.listdir(base + "task"):
        try:
            thread = _read(f"{base}task/{tid}/status")
        except _VANISHED:
            continue  # a thread that ended since the listing
        for name, count in _fields(thread, _SWITCHES).items():
            found[name] += count
    return found


def _smaps(_: Any, base: str) -> dict[str, int]:
    names = {b"Pss": "proportional_bytes", b"SwapPss": "proportional_swap_bytes"}
    try:
        return _fields(_read(base + "smaps_rollup"), names, 1024)
    except ProcessLookupError:  # no memory to read: a kernel thread, a zombie
        return dict.fromkeys(names.values(), 0)


def _fd(source: ProcfsSource, base: str) -> dict[str, int]:
    return {"open_fds": source._open_fds(base)}


def _fd_limit(_: Any, base: str) -> dict[str, int]:
    """The soft limit on open descriptors (0: unlimited)."""
    for line in _read(base + "limits").splitlines():
        if line.startswith(b"Max open files"):
            soft = line[len(b"Max open files") :].split()[0]
            return {"fd_limit": 0 if soft == b"unlimited" else int(soft)}
    return {"fd_limit": 0}


_READS: dict[str, Callable[[Any, str], dict[str, Any]]] = {
    "io": _io,
    "fd": _fd,
    "limits": _fd_limit,
    "status": _status,
    "smaps_rollup": _smaps,
}
"""How to read each file of :data:`~kvm_exporter.records.DETAIL_FILES`."""


class ProcfsSource:
    """Reads a procfs mounted at ``root`` (``/proc``; a copy of one in tests)."""

    name = "procfs"
    states = STATES

    def __init__(self, root: str = "/proc") -> None:
        self.root = root
        if not os.path.isfile(os.path.join(root, "loadavg")):
            if visibility.procfs_subset(root) == "pid":
                raise SourceError(
                    f"{root} is mounted with subset=pid (systemd ProcSubset=pid), which leaves"
                    " out loadavg, swaps and the rest of /proc but the process directories:"
                    " mount it without subset=pid (ProcSubset=all)"
                )
            raise SourceError(f"{root} does not look like procfs: no {root}/loadavg")
        self._dev_names: dict[int, str] | None = None
        self._ttys: dict[bytes, str] = {}
        """tty name per raw ``tty_nr`` field of ``stat``: a few distinct values on any host."""
        self._rows: Any = _ffi.new("struct kvm_census_row[]", 256) if _ffi is not None else None
        self._room = 1024
        """Usage rows _procscan gets room for: what the last survey needed, and some."""
        self._boot: int | None = None
        self._fd_sizes: bool | None = None
        """Whether the kernel gives open descriptors as ``PID/fd``'s size (6.2 and later)."""
        self.usage_spec = UsageSpec(
            page_size=_PAGE_SIZE,
            counters=_USAGE_COUNTERS,
            decode=_USAGE_ROW.unpack,
            state=lambda code: _STATE_OF_CODE.get(code, "unknown"),  # a state letter's
            start_time=lambda ticks, _: self._boot_time() + ticks / _CLK_TCK,
        )

    def _boot_time(self) -> int:
        if self._boot is None:
            for line in _read_text(f"{self.root}/stat").splitlines():
                if line.startswith("btime "):
                    self._boot = int(line.split()[1])
                    break
            else:
                raise SourceError(f"no btime line in {self.root}/stat")
        return self._boot

    def _tty(self, tty_nr: int) -> str:
        name = tty_name(tty_nr, self._dev_names or {})
        if ":" in name and self._dev_names is None:
            self._dev_names = dev_char_names()  # scanned once, on the first unusual tty
            name = tty_name(tty_nr, self._dev_names)
        return name

    def procs(self) -> list[Proc]:
        """Every process, with its real uid from ``PID/status``, a read the census and the
        survey do without (it about doubles the kernel's work per process)."""
        boot = self._boot_time()
        return self._in_proc_dir(lambda dir_fd: self._scan(dir_fd, boot))

    def census(self) -> Census:
        return self._census(usage=False)[0]

    def survey(self) -> Survey:
        """The census and each process's usage row (PID/stat), from the same reads."""
        clock = int(time.clock_gettime(time.CLOCK_BOOTTIME) * _CLK_TCK)  # starttime's clock
        return Survey(*self._census(usage=True), clock)

    def _census(self, usage: bool) -> tuple[Census, Sequence[bytes]]:
        census, records = self._in_proc_dir(lambda dir_fd: self._walk(dir_fd, usage))
        if not census:  # even hidepid=invisible shows the reader its own process
            raise SourceError(f"{self.root} has no process directory (PID/stat)")
        return census, records

    def _walk(self, dir_fd: int, usage: bool) -> tuple[Census, Sequence[bytes]]:
        """The census and, with ``usage``, the usage records, in C where it was built."""
        if _lib is not None:
            raw, records = self._census_c(dir_fd, usage)
            return self._kinds(raw), records
        found: list[bytes] = []
        return self._kinds(_census_py(dir_fd, found if usage else None)), found

    def cgroup(self, pid: int) -> str:
        """The cgroup of process ``pid`` (the v2 path; v1: the systemd hierarchy's), read
        once per process; ``unknown`` if it cannot be read (gone, hidden)."""
        paths = dict(self._cgroup_lines(pid, "replace"))
        return paths.get("", paths.get("name=systemd", "unknown")) or "unknown"

    def cgroups(self, pid: int) -> tuple[str, ...]:
        """Every cgroup path of process ``pid``, one per hierarchy in the file's order, as
        process-exporter's ``{{.Cgroups}}`` lists them; none if it cannot be read."""
        return tuple(path for _, path in self._cgroup_lines(pid, "surrogateescape"))

    def _cgroup_lines(self, pid: int, errors: str) -> list[tuple[str, str]]:
        """(controllers, path) of each line of ``PID/cgroup``; none if it cannot be read."""
        try:
            lines = _read(f"{self.root}/{pid}/cgroup").decode("utf-8", errors).splitlines()
        except OSError:
            return []
        return [
            (c, p) for _, c, p in (line.split(":", 2) for line in lines if line.count(":") >= 2)
        ]

    def thread_states(self, pid: int) -> list[str] | None:
        """The state of each thread of process ``pid`` (``PID/task/TID/stat``), which
        process-exporter adds to its states; None if the process has gone or hides them."""
        task = f"{self.root}/{pid}/task"
        try:
            tids = os.listdir(task)
        except OSError:
            return None
        states = []
        for tid in tids:
            try:
                data = _read(f"{task}/{tid}/stat", size=1024)
            except OSError:
                continue  # a thread that ended since the listing
            states.append(_STATE_OF_CODE.get(data[data.rindex(b")") + 2], "unknown"))
        return states

    def details(self, pid: int, wanted: Collection[str]) -> Details | None:
        """The ``wanted`` details (:data:`~kvm_exporter.records.DETAILS`) of process ``pid``,
        a file or two each; None if it has gone. A file the kernel refuses (``io``, the
        ``fd`` listing and ``smaps_rollup`` of another user's process need ptrace access) is
        named in :attr:`Details.refused` and its values left 0."""
        base = f"{self.root}/{pid}/"
        values: dict[str, Any] = {}
        refused: list[str] = []
        try:
            for detail in wanted:
                for name in DETAIL_FILES[detail]:
                    try:
                        values.update(_READS[name](self, base))
                    except PermissionError:
                        refused.append(name)
                    except (OSError, ValueError, IndexError) as err:
                        if isinstance(err, _VANISHED):
                            raise
                        refused.append(name)  # content no kernel writes: not the poll's end
        except _VANISHED:
            return None
        limit = values.pop("fd_limit", 0)
        if limit and "fd" not in refused:
            values["fd_ratio"] = values["open_fds"] / limit
        return Details(**values, refused=tuple(refused))

    def _open_fds(self, base: str) -> int:
        """Open descriptors of a process: since Linux 6.2 the size of its ``fd`` directory
        (one stat, allowed for any process), before that a listing (ptrace access only)."""
        if self._fd_sizes is None:  # this process has descriptors open: a size if it has one
            try:
                self._fd_sizes = os.stat(f"{self.root}/self/fd").st_size > 0
            except OSError:  # not a procfs (a copy of one): list
                self._fd_sizes = False
        if self._fd_sizes:
            return os.stat(base + "fd").st_size
        return len(os.listdir(base + "fd"))

    def jail_name(self, jid: int) -> str:
        """Linux has no jails: every process is the host's."""
        return HOST_JAIL

    def visibility(self) -> dict[str, bool]:
        """hidepid and PID namespace of the procfs read."""
        return visibility.procfs(self.root)

    def _memory_bytes(self) -> int | None:
        """MemTotal of meminfo; None without one."""
        try:
            lines = _read(f"{self.root}/meminfo").splitlines()
        except OSError:
            return None
        total = next((line.split() for line in lines if line.startswith(b"MemTotal:")), None)
        return int(total[1]) * 1024 if total and total[1].isdigit() else None

    def _in_proc_dir(self, scan: Callable[[int], T]) -> T:
        """Run ``scan`` on an open ``root``, its errors turned into :class:`SourceError`."""
        try:
            dir_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as err:
            raise SourceError(f"cannot open {self.root}: {err.strerror}") from None
        try:
            return scan(dir_fd)
        except OSError as err:
            raise SourceError(f"cannot list {self.root}: {err.strerror}") from None
        except (ValueError, IndexError) as err:  # content no kernel writes
            raise SourceError(f"{self.root}: unexpected PID/stat or PID/status: {err}") from None
        finally:
            os.close(dir_fd)

    def _kinds(self, raw: Iterable[RawKind]) -> Census:
        census: Census = {}
        for (uid, tty_nr, letter, threads), count in raw:
            kind = (uid, self._tty(tty_nr), _STATE_OF.get(letter, "unknown"), threads, 0)
            census[kind] = census.get(kind, 0) + count  # two raw values can share a name
        return census

    def _census_c(self, dir_fd: int, usage: bool) -> tuple[list[RawKind], Sequence[bytes]]:
        """The census in C; with ``usage``, each process's usage record from the same walk."""
        assert _ffi is not None and _lib is not None
        # Room for this walk only: freed with its records, not kept between polls.
        room = self._room if usage else 0
        procs = _new_uncleared("struct kvm_usage_row[]", room) if room else _ffi.NULL
        nprocs = _ffi.new("int *")
        while True:
            found = _lib.kvm_survey(dir_fd, self._rows, len(self._rows), procs, room, nprocs)
            if found == -1:
                raise OSError(_ffi.errno, os.strerror(_ffi.errno))
            if found == -2:
                raise ValueError("a PID/stat without its fields")
            if found > len(self._rows):
                self._rows = _ffi.new("struct kvm_census_row[]", 2 * found)  # many kinds: grow
            elif nprocs[0] > room:
                room = self._room = nprocs[0] + nprocs[0] // 8 + 64
                procs = _new_uncleared("struct kvm_usage_row[]", room)
            else:
                break
        records: Sequence[bytes] = ()
        if usage:
            size = _USAGE_ROW.size
            records = digests.records(_ffi.buffer(procs, nprocs[0] * size), nprocs[0], size, size)
        kinds = [((r.uid, r.tty_nr, r.state, r.threads), r.count) for r in self._rows[0:found]]
        return kinds, records

    def _scan(self, dir_fd: int, boot: int) -> list[Proc]:
        """Every process in Python, from its PID/stat and PID/status."""
        out: list[Proc] = []
        for pid in os.listdir(dir_fd):
            if not pid.isdigit():
                continue
            try:
                stat = _read(pid + "/stat", dir_fd, _READ_SIZE)
                status = _read(pid + "/status", dir_fd, _READ_SIZE)
            except _VANISHED:
                continue  # exited between listdir and read
            if not stat or not status:
                continue  # a pid being reaped can read as empty
            ruid, uid = _status_uids(status)
            comm, f = parse_stat(stat, _STAT_FIELDS)
            tty = self._ttys.get(f[4])
            if tty is None:
                tty = self._ttys[f[4]] = self._tty(int(f[4]))
            out.append(
                Proc(
                    int(pid),
                    int(f[1]),
                    uid,
                    ruid,
                    tty,
                    _STATE_OF.get(f[0], "unknown"),
                    comm,
                    int(f[17]),
                    int(f[21]) * _PAGE_SIZE,
                    int(f[20]),
                    (int(f[11]) + int(f[12])) / _CLK_TCK,
                    boot + int(f[19]) / _CLK_TCK,
                )
            )
        return out

    def argv(self, pid: int) -> tuple[str, ...] | None:
        """``/proc/PID/cmdline``: empty for a kernel thread or a zombie, unreadable (None)
        under ``hidepid`` or once the process has gone. Where it is empty, a live thread's
        (``PID/task/TID/cmdline``): a process whose first thread exited has its arguments
        there only."""
        try:
            argv = split_argv(_read(f"{self.root}/{pid}/cmdline", size=ARGV_BYTES))
            if argv:
                return argv
            for tid in os.listdir(f"{self.root}/{pid}/task"):
                if tid != str(pid):
                    thread = _read(f"{self.root}/{pid}/task/{tid}/cmdline", size=ARGV_BYTES)
                    if thread:
                        return split_argv(thread)
            return argv
        except OSError:
            return None

    def loadavg(self) -> LoadAvg:
        text = _read_text(f"{self.root}/loadavg")
        try:
            one, five, fifteen = (float(v) for v in text.split()[:3])
        except ValueError:
            raise SourceError(f"{self.root}/loadavg: unexpected content {text!r}") from None
        return LoadAvg(one, five, fifteen)

    def swap(self) -> list[SwapDevice]:
        path = f"{self.root}/swaps"
        try:
            lines = _read(path).splitlines()[1:]  # first line is a header
        except OSError as err:
            raise SourceError(f"cannot read {path}: {err.strerror}") from None
        devices = []
        try:
            for line in lines:
                fields = line.split()
                # The kernel escapes space, tab, newline and backslash in a name as octal
                # (\040); other bytes are the file name's own, UTF-8 or not.
                name = _OCTAL.sub(lambda m: bytes([int(m[1], 8)]), fields[0])
                size, used = int(fields[2]) * 1024, int(fields[3]) * 1024
                devices.append(SwapDevice(name.decode("utf-8", "replace"), size, used))
        except (ValueError, IndexError):
            raise SourceError(f"{path}: unexpected line {line!r}") from None
        return devices

    def limits(self) -> HostLimits:
        cpus = sum(
            1
            for line in _read_lines(f"{self.root}/stat")  # whole: a line per CPU
            if line.startswith(b"cpu") and line[3:4].isdigit()
        )
        pid_max = _read_int(f"{self.root}/sys/kernel/pid_max")
        threads_max = _read_int(f"{self.root}/sys/kernel/threads-max")
        # Linux limits tasks, not processes: every process and every thread is a task, and
        # fork/clone fail when the tasks reach threads-max or run out of PIDs (1 to
        # pid_max - 1). A process is at least one task, so both limits are the task limit.
        tasks = min(pid_max - 1, threads_max)
        return HostLimits(
            cpus=cpus,
            max_procs=tasks,
            max_threads=tasks,
            memory_bytes=self._memory_bytes(),
            pid_max=pid_max,
            threads_max=threads_max,
        )

    def host_usage(self) -> HostUsage:
        """The ``cpu`` line (guest time is already in user and nice) and ``processes`` of
        ``stat``; ``pgfault`` (all faults) and ``pgmajfault`` of ``vmstat``."""
        path = f"{self.root}/stat"
        try:
            lines = {line.split(None, 1)[0]: line.split()[1:] for line in _read_lines(path)}
            ticks = [int(v) for v in lines[b"cpu"][: len(_CPU_MODES)]]
            forks = int(lines[b"processes"][0])
        except (KeyError, ValueError, IndexError):
            raise SourceError(f"{path}: no cpu or processes line as Linux writes them") from None
        faults: dict[str, int] = {}
        try:
            counts = dict(line.split()[:2] for line in _read_lines(f"{self.root}/vmstat"))
            major = int(counts[b"pgmajfault"])
            faults = {"minor": int(counts[b"pgfault"]) - major, "major": major}
        except (SourceError, KeyError, ValueError):
            pass  # a kernel without these counts: no host faults, the rest stands
        cpu = {mode: t / _CLK_TCK for mode, t in zip(_CPU_MODES, ticks, strict=False)}
        return HostUsage(cpu, faults, forks)

    def close(self) -> None:
        """Nothing to release: every read opens and closes its own file."""
