"""The Linux source: processes, load and swap from ``/proc``.

Each process costs two reads: ``/proc/PID/stat`` (state, tty, threads, memory, times) and
``/proc/PID/status`` (real and effective uid). The uid cannot come from ``stat()`` of a
file inside ``/proc/PID``: for a non-dumpable (setuid) process those files belong to root,
while ``ps`` shows the process's own uid, which ``status`` reports for every process.
"""

from __future__ import annotations

import os
import re
import stat as statmod

from ..records import NO_TTY, HostLimits, LoadAvg, Proc, SourceError, SwapDevice
from ..states import LINUX_STATES

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_VANISHED = (FileNotFoundError, ProcessLookupError)
_OCTAL = re.compile(rb"\\([0-3][0-7]{2})")
_READ_SIZE = 4096  # stat is ~300 bytes, status ~1.5 KiB; the uid lines are in the first 300
_STAT_FIELDS = 22  # split no further than rss, the last field read
_STATE_OF = {letter.encode(): state for letter, state in LINUX_STATES.items()}


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 16384)
    finally:
        os.close(fd)


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


class ProcfsSource:
    """Reads a procfs mounted at ``root`` (``/proc``; a copy of one in tests)."""

    name = "procfs"

    def __init__(self, root: str = "/proc") -> None:
        self.root = root
        if not os.path.isfile(os.path.join(root, "loadavg")):
            raise SourceError(f"{root} does not look like procfs: no {root}/loadavg")
        self._dev_names: dict[int, str] | None = None
        self._ttys: dict[bytes, str] = {}
        """tty name per raw ``tty_nr`` field of ``stat``: a few distinct values on any host."""

    def _boot_time(self) -> int:
        for line in _read_text(f"{self.root}/stat").splitlines():
            if line.startswith("btime "):
                return int(line.split()[1])
        raise SourceError(f"no btime line in {self.root}/stat")

    def _tty(self, tty_nr: int) -> str:
        name = tty_name(tty_nr, self._dev_names or {})
        if ":" in name and self._dev_names is None:
            self._dev_names = dev_char_names()  # scanned once, on the first unusual tty
            name = tty_name(tty_nr, self._dev_names)
        return name

    def procs(self) -> list[Proc]:
        boot = self._boot_time()
        try:
            dir_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as err:
            raise SourceError(f"cannot open {self.root}: {err.strerror}") from None
        try:
            return self._scan(dir_fd, boot)
        except OSError as err:
            raise SourceError(f"cannot list {self.root}: {err.strerror}") from None
        except (ValueError, IndexError) as err:  # content no kernel writes
            raise SourceError(f"{self.root}: unexpected PID/stat or PID/status: {err}") from None
        finally:
            os.close(dir_fd)

    def _scan(self, dir_fd: int, boot: int) -> list[Proc]:
        # The hot loop of the exporter (about 10,000 iterations a poll on a busy host): names
        # bound to locals, paths relative to an open /proc, tty names cached by raw tty_nr.
        open_, read, close = os.open, os.read, os.close
        ttys = self._ttys
        out: list[Proc] = []
        append = out.append
        for pid in os.listdir(dir_fd):
            if not pid.isdigit():
                continue
            try:
                fd = open_(pid + "/stat", os.O_RDONLY, dir_fd=dir_fd)
                try:
                    stat = read(fd, _READ_SIZE)
                finally:
                    close(fd)
                fd = open_(pid + "/status", os.O_RDONLY, dir_fd=dir_fd)
                try:
                    status = read(fd, _READ_SIZE)
                finally:
                    close(fd)
            except _VANISHED:
                continue  # exited between listdir and read
            if not stat or not status:
                continue  # a pid being reaped can read as empty
            comm, f = parse_stat(stat, _STAT_FIELDS)
            ruid, uid = _status_uids(status)
            tty = ttys.get(f[4])
            if tty is None:
                tty = ttys[f[4]] = self._tty(int(f[4]))
            append(
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
            for line in _read_text(f"{self.root}/stat").splitlines()
            if line.startswith("cpu") and line[3:4].isdigit()
        )
        pid_max = _read_int(f"{self.root}/sys/kernel/pid_max")
        threads_max = _read_int(f"{self.root}/sys/kernel/threads-max")
        return HostLimits(cpus=cpus, max_procs=pid_max, max_threads=threads_max)

    def close(self) -> None:
        """Nothing to release: every read opens and closes its own file."""
