"""The FreeBSD source: processes, load and swap through libkvm (kvm(3), not the hypervisor).

A live system is opened unprivileged the way ``ps`` does it (memory file ``/dev/null``:
everything below is then read through sysctls); a crash dump is opened from its kernel
image and core file.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import sys
import threading
from collections import Counter
from operator import itemgetter
from typing import Any, Literal, NamedTuple

from ..config import LibkvmConfig
from ..records import (
    NO_TTY,
    Census,
    HostLimits,
    Kind,
    LoadAvg,
    Proc,
    SourceError,
    SwapDevice,
    census_of,
)
from ..states import MAXSLP, TDF_SINTR, freebsd_state
from . import kvm_cdef
from .kvm_cdef import ffi

# kvm_getprocs(3) ops, sys/sys/sysctl.h.
KERN_PROC_OPS: dict[str, int] = {
    "all": 0,
    "pid": 1,
    "pgrp": 2,
    "session": 3,
    "tty": 4,
    "uid": 5,
    "ruid": 6,
    "proc": 8,
}
KERN_PROC_INC_THREAD = 0x10
O_RDONLY = 0
ERRBUF_SIZE = 2048  # _POSIX2_LINE_MAX, what kvm_openfiles copies into errbuf
NODEV = 2**64 - 1  # (dev_t)-1 in the 64-bit ki_tdev
S_IFCHR = 0o020000
DEVNAME_SIZE = 256  # SPECNAMELEN + 1
MAX_SWAP_DEVICES = 256  # per-device entries asked for; the grand total counts every device
CLOSE_WAIT = 0.5  # seconds close() waits for a call in progress

log = logging.getLogger(__name__)


class LibkvmSource:
    """:class:`~kvm_exporter.records.Source` over one ``kvm_t`` handle."""

    name = "libkvm"

    def __init__(self, config: LibkvmConfig) -> None:
        self._lib = kvm_cdef.load(config.library)
        if config.predicate not in ("proc", "all") and config.argument is None:
            raise SourceError(
                f"libkvm.predicate {config.predicate!r} selects by a number: set libkvm.argument"
            )
        if not -(2**31) <= (config.argument or 0) < 2**31:
            raise SourceError(f"libkvm.argument {config.argument} does not fit kvm_getprocs' int")
        base_op = KERN_PROC_OPS[config.predicate]
        self._op = base_op | (KERN_PROC_INC_THREAD if config.threads else 0)
        self._arg = config.argument or 0
        self._by_pid = base_op == KERN_PROC_OPS["pid"]
        # KERN_PROC_ALL returns one row per thread even without the modifier.
        self._per_thread = config.threads or base_op == KERN_PROC_OPS["all"]
        self._lock = threading.Lock()
        self._devname = ffi.new("char[]", DEVNAME_SIZE)
        errbuf = ffi.new("char[]", ERRBUF_SIZE)
        if config.core is None:
            where = "the running kernel"
            kd = self._lib.kvm_openfiles(ffi.NULL, b"/dev/null", ffi.NULL, O_RDONLY, errbuf)
        else:
            where = f"crash dump {config.core!r} (kernel {config.kernel or 'the booted one'})"
            kd = self._lib.kvm_openfiles(
                _path(config.kernel), _path(config.core), _path(config.swapfile), O_RDONLY, errbuf
            )
        if kd == ffi.NULL:
            reason = _text(errbuf) or os.strerror(ffi.errno)
            raise SourceError(f"kvm_openfiles cannot open {where}: {reason}")
        self._kd: Any = kd
        self.crash_dump = config.core is not None
        try:
            self._pagesize = self._sysctl_int("hw.pagesize")
        except SourceError:
            self.close()
            raise

    def procs(self) -> list[Proc]:
        """Every process the predicate selects (one record per process)."""
        with self._lock:
            base, count = self._getprocs()
            if count == 0:
                return []
            records = ffi.cast(_record_type(ffi.cast("int *", base)[0]) + " *", base)
            # The array belongs to libkvm and the next call frees it: copy out now.
            # tty names are cached per poll, because a pts device number can be reused.
            ttys: dict[int, str] = {}
            procs = [self._proc(records[i], ttys) for i in range(count)]
        return _fold_threads(procs) if self._per_thread else procs

    def census(self) -> Census:
        """The census of :meth:`procs`, read without a Python object per process.

        The six fields a kind needs are gathered from the kinfo_proc array into rows of
        their own at C speed (strided memoryview copies), equal rows are counted as bytes,
        and only each distinct row becomes a :data:`~kvm_exporter.records.Kind`.
        """
        if self._per_thread:
            # Thread rows fold into one process per pid with its visible threads.
            return census_of(self.procs())
        with self._lock:
            base, count = self._getprocs()
            if count == 0:
                return {}
            layout = _census_layout(_record_type(ffi.cast("int *", base)[0]))
            # The array belongs to libkvm and the next call frees it: the rows are a copy.
            with memoryview(ffi.buffer(base, count * layout.structsize)) as array:
                rows = _census_rows(array, count, layout)
            counts = Counter(_ROWS.iter_unpack(rows))
            distinct = list(_ROW.iter_unpack(b"".join(map(itemgetter(0), counts))))
            # A tty name once per device, not per process; devname_r writes self._devname,
            # so this stays under the lock.
            ttys: dict[int, str] = {}
            for tdev in set(map(itemgetter(0), distinct)):
                ttys[tdev] = self._tty(tdev, ttys)
        kinds: list[Kind] = list(
            zip(
                map(itemgetter(1), distinct),
                map(ttys.__getitem__, map(itemgetter(0), distinct)),
                map(_STATE_WORDS.__getitem__, map(itemgetter(3), distinct)),
                map(itemgetter(2), distinct),
                strict=True,
            )
        )
        census = dict(zip(kinds, counts.values(), strict=True))
        if len(census) < len(kinds):  # two devices with one name, or both without one
            census = {}
            for kind, n in zip(kinds, counts.values(), strict=True):
                census[kind] = census.get(kind, 0) + n
        return census

    def loadavg(self) -> LoadAvg:
        samples = ffi.new("double[3]")
        with self._lock:
            kd = self._handle()
            self._clear_error(kd)
            got = self._lib.kvm_getloadavg(kd, samples, 3)
            if got != 3:
                raise self._failure(f"kvm_getloadavg (got {got} of 3 samples)", kd)
        return LoadAvg(samples[0], samples[1], samples[2])

    def swap(self) -> list[SwapDevice]:
        """One record per swap device, in bytes."""
        entries = ffi.new("struct kvm_swap[]", MAX_SWAP_DEVICES + 1)
        with self._lock:
            kd = self._handle()
            self._clear_error(kd)
            # flags 0: libkvm's SWIF_DEV_PREFIX would cut long names to fit 32 bytes.
            got = self._lib.kvm_getswapinfo(kd, entries, MAX_SWAP_DEVICES + 1, 0)
            if got < 0:
                raise self._failure("kvm_getswapinfo", kd)
        devices = [entries[i] for i in range(got)]
        total = entries[got]  # the grand total sits after the devices, at the returned index
        if got < MAX_SWAP_DEVICES and (
            sum(d.ksw_used for d in devices) != total.ksw_used
            or sum(d.ksw_total for d in devices) != total.ksw_total
        ):
            raise SourceError(
                f"kvm_getswapinfo: the grand total ({total.ksw_used} of {total.ksw_total} pages"
                f" used) is not the sum of the {got} devices: struct kvm_swap is misread"
            )
        return [
            SwapDevice(
                _swap_name(_text(d.ksw_devname)),
                d.ksw_total * self._pagesize,
                d.ksw_used * self._pagesize,
            )
            for d in devices
        ]

    def limits(self) -> HostLimits:
        """Kernel limits: sysctls of a live system, kernel variables of a crash dump."""
        if self.crash_dump:
            # sysctlbyname would describe the running host, not the dead kernel.
            cpus, procs, threads = self._kernel_ints(("_mp_ncpus", "_maxproc", "_maxthread"))
        else:
            cpus, procs, threads = (
                self._sysctl_int(name) for name in ("hw.ncpu", "kern.maxproc", "kern.maxthread")
            )
        # kern.maxthread (FreeBSD 13+) is the system-wide thread limit;
        # kern.threads.max_threads_per_proc is per process and would overstate it.
        return HostLimits(cpus=cpus, max_procs=procs, max_threads=threads)

    def close(self) -> None:
        """Release the handle; later calls raise :class:`SourceError`."""
        if not self._lock.acquire(timeout=CLOSE_WAIT):
            # A libkvm call that hangs holds the lock: leave the handle to the process's exit
            # rather than hang a shutdown or a reload behind it.
            log.warning("libkvm busy for %.1f s: not closing its handle", CLOSE_WAIT)
            return
        try:
            kd, self._kd = self._kd, None
            if kd is not None:
                self._lib.kvm_close(kd)
        finally:
            self._lock.release()

    def _handle(self) -> Any:
        if self._kd is None:
            raise SourceError("the libkvm source is closed")
        return self._kd

    def _getprocs(self) -> tuple[Any, int]:
        """kvm_getprocs (the caller holds the lock): the array and its record count.

        The array is libkvm's until its next call; a pid that has gone is no records.
        """
        kd = self._handle()
        self._clear_error(kd)
        count = ffi.new("int *", -1)
        base = self._lib.kvm_getprocs(kd, self._op, self._arg, count)
        if base == ffi.NULL:
            if ffi.errno == errno.ESRCH and self._by_pid:
                return base, 0  # KERN_PROC_PID of a process that has gone, as ps treats it
            raise self._failure("kvm_getprocs", kd)
        return base, int(count[0])

    def _clear_error(self, kd: Any) -> None:
        # libkvm never clears its errbuf, so empty it before a call: a failure's text is
        # then that call's own, and an empty text means the call set none.
        self._lib.kvm_geterr(kd)[0] = b"\0"

    def _failure(self, call: str, kd: Any) -> SourceError:
        code = ffi.errno
        reason = _text(self._lib.kvm_geterr(kd)) or (os.strerror(code) if code else "no reason")
        return SourceError(f"{call} failed: {reason}")

    def _sysctl_int(self, name: str) -> int:
        value = ffi.new("int *")
        size = ffi.new("size_t *", ffi.sizeof("int"))
        if self._lib.sysctlbyname(name.encode(), value, size, ffi.NULL, 0) != 0:
            raise SourceError(f"sysctl {name}: {os.strerror(ffi.errno)}")
        return int(value[0])

    def _kernel_ints(self, symbols: tuple[str, ...]) -> list[int]:
        """The ``int`` kernel variables ``symbols`` of a crash dump (kvm_nlist2, kvm_read2)."""
        names = [ffi.new("char[]", symbol.encode()) for symbol in symbols]
        entries = ffi.new("struct kvm_nlist[]", len(symbols) + 1)  # NULL-name terminated
        for i, name in enumerate(names):
            entries[i].n_name = name
        value = ffi.new("int *")
        values = []
        with self._lock:
            kd = self._handle()
            self._clear_error(kd)
            not_found = self._lib.kvm_nlist2(kd, entries)
            if not_found < 0:
                raise self._failure("kvm_nlist2", kd)
            if not_found:
                missing = [s for i, s in enumerate(symbols) if entries[i].n_type == 0]  # N_UNDF
                raise SourceError(f"kvm_nlist2: the kernel has no symbol {', '.join(missing)}")
            for i, symbol in enumerate(symbols):
                if self._lib.kvm_read2(kd, entries[i].n_value, value, ffi.sizeof("int")) != 4:
                    raise self._failure(f"kvm_read2 of {symbol}", kd)
                values.append(int(value[0]))
        return values

    def _proc(self, kp: Any, ttys: dict[int, str]) -> Proc:
        return Proc(
            pid=kp.ki_pid,
            ppid=kp.ki_ppid,
            uid=kp.ki_uid,
            ruid=kp.ki_ruid,
            tty=self._tty(kp.ki_tdev, ttys),
            state=freebsd_state(kp.ki_stat, kp.ki_tdflags, kp.ki_slptime),
            comm=_text(kp.ki_comm),
            threads=kp.ki_numthreads,
            rss_bytes=kp.ki_rssize * self._pagesize,
            vsize_bytes=kp.ki_size,
            cpu_seconds=kp.ki_runtime / 1e6,
            start_time=kp.ki_start.tv_sec + kp.ki_start.tv_usec / 1e6,
        )

    def _tty(self, dev: int, cache: dict[int, str]) -> str:
        if dev == NODEV:
            return NO_TTY
        name = cache.get(dev)
        if name is None:
            name = _text(self._lib.devname_r(dev, S_IFCHR, self._devname, DEVNAME_SIZE))
            # devname_r never fails; "#NODEV" or "#C:0x..." is its way of saying "no name".
            if name.startswith("#"):
                name = NO_TTY
            cache[dev] = name
        return name


def _record_type(structsize: int) -> str:
    pointer_bits = ffi.sizeof("void *") * 8
    known = kvm_cdef.KINFO_PROC_TYPES[ffi.sizeof("void *")]
    record_type = known.get(structsize)
    if record_type is None:
        sizes = " or ".join(str(size) for size in known)
        raise SourceError(
            f"kvm_getprocs: the kernel's struct kinfo_proc is {structsize} bytes"
            f" (ki_structsize), this {pointer_bits}-bit binding knows {sizes}:"
            " refusing to read records of an unknown layout"
        )
    return record_type


class _CensusLayout(NamedTuple):
    """Where a record type keeps what :meth:`LibkvmSource.census` reads: byte offsets."""

    structsize: int
    tdev: int
    uid: int
    numthreads: int
    stat: int
    tdflags_low: int
    """The byte of ki_tdflags that holds TDF_SINTR (0x8): its least significant byte."""
    slptime: int


_ROW = struct.Struct("=QIiB7x")
"""A census row: ki_tdev, ki_uid, ki_numthreads and the state (an index of
:data:`_STATE_WORDS`); padded to 24 bytes so that every field is aligned in it."""
_ROWS = struct.Struct(f"{_ROW.size}s")
_CENSUS_LAYOUTS: dict[str, _CensusLayout] = {}
_IntFormat = Literal["B", "i", "I", "Q"]


def _state_tables() -> tuple[bytes, bytes, bytes, tuple[str, ...]]:
    """Translation tables that give each record its state word at C speed.

    ``freebsd_state`` reads ki_stat, the TDF_SINTR bit of ki_tdflags (0x8, in its low
    byte) and whether ki_slptime reaches MAXSLP, nothing else. Per record the census
    computes ``stat_code[ki_stat] | sintr[low byte of ki_tdflags] | slept`` (slept: 1 if
    ki_slptime >= MAXSLP), where ``stat_code`` gives every ki_stat value that behaves alike
    one code (a multiple of 4); ``word_of[that]`` is then the state's index in ``words``.
    The tables come from ``freebsd_state`` itself, so they cannot disagree with it.
    """
    if not 0 < TDF_SINTR < 0x100:
        raise AssertionError("the census reads TDF_SINTR from the low byte of ki_tdflags")
    flags = [(tdflags, slptime) for tdflags in (0, TDF_SINTR) for slptime in (0, MAXSLP)]
    behaviours = [tuple(freebsd_state(stat, *f) for f in flags) for stat in range(256)]
    distinct = list(dict.fromkeys(behaviours))
    words = tuple(sorted({word for behaviour in distinct for word in behaviour}))
    stat_code = bytes(4 * distinct.index(behaviour) for behaviour in behaviours)
    sintr = bytes(2 if byte & TDF_SINTR else 0 for byte in range(256))
    word_of = bytearray(256)
    for code, behaviour in enumerate(distinct):
        for i, word in enumerate(behaviour):  # i: 2 * sintr + slept, as in flags
            word_of[4 * code + i] = words.index(word)
    return stat_code, sintr, bytes(word_of), words


_STAT_CODE, _SINTR, _WORD_OF, _STATE_WORDS = _state_tables()


def _census_layout(record_type: str) -> _CensusLayout:
    """The census offsets of ``record_type``, from its cffi declaration (once per type)."""
    layout = _CENSUS_LAYOUTS.get(record_type)
    if layout is None:
        fields = dict(ffi.typeof(record_type).fields)

        def offset(name: str, ctype: str) -> int:
            field = fields[name]
            if field.type.cname != ctype:  # what _census_rows copies it as
                raise SourceError(f"{record_type}.{name} is {field.type.cname}, not {ctype}")
            return int(field.offset)

        tdflags = fields["ki_tdflags"]
        low = 0 if sys.byteorder == "little" else ffi.sizeof(tdflags.type) - 1
        layout = _CensusLayout(
            structsize=ffi.sizeof(record_type),
            tdev=offset("ki_tdev", "uint64_t"),
            uid=offset("ki_uid", "uint32_t"),
            numthreads=offset("ki_numthreads", "int32_t"),
            stat=offset("ki_stat", "uint8_t"),
            tdflags_low=int(tdflags.offset) + low,
            slptime=offset("ki_slptime", "uint32_t"),
        )
        _CENSUS_LAYOUTS[record_type] = layout
    return layout


def _census_rows(records: memoryview, count: int, layout: _CensusLayout) -> bytearray:
    """One :data:`_ROW` per record of ``records`` (``count`` records of ``layout``).

    Each field is one strided copy between memoryviews, and the state comes from
    translation tables and one OR of the columns as integers: no Python object per record.
    """
    size = layout.structsize
    rows = bytearray(count * _ROW.size)
    out = memoryview(rows)

    def column(offset: int, fmt: _IntFormat) -> memoryview:
        width = struct.calcsize(fmt)
        return records[offset : offset + (count - 1) * size + width].cast(fmt)[:: size // width]

    def put(position: int, fmt: _IntFormat, values: Any) -> None:
        width = struct.calcsize(fmt)
        out.cast(fmt)[position // width :: _ROW.size // width] = values

    def bits(column: bytes) -> int:
        return int.from_bytes(column, "little")

    put(0, "Q", column(layout.tdev, "Q"))
    put(8, "I", column(layout.uid, "I"))
    put(12, "i", column(layout.numthreads, "i"))
    slept = bytes(map(MAXSLP.__le__, column(layout.slptime, "I").tolist()))
    states = (
        bits(column(layout.stat, "B").tobytes().translate(_STAT_CODE))
        | bits(column(layout.tdflags_low, "B").tobytes().translate(_SINTR))
        | bits(slept)
    )
    put(16, "B", states.to_bytes(count, "little").translate(_WORD_OF))
    return rows


def _fold_threads(rows: list[Proc]) -> list[Proc]:
    """One record per process from thread rows: the first row, with its visible threads."""
    first: dict[int, Proc] = {}
    threads: Counter[int] = Counter()
    for row in rows:
        first.setdefault(row.pid, row)
        threads[row.pid] += 1
    return [proc._replace(threads=threads[pid]) for pid, proc in first.items()]


def _swap_name(devname: str) -> str:
    # Swap over NFS has no device; libkvm names it "[NFS swap]".
    return devname if devname.startswith("[") else "/dev/" + devname


def _path(value: str | None) -> Any:
    return ffi.NULL if value is None else os.fsencode(value)


def _text(chars: Any) -> str:
    return str(ffi.string(chars).decode("utf-8", "replace"))
