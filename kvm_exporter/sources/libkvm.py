"""The FreeBSD source: processes, load and swap through libkvm (kvm(3), not the hypervisor).

A live system is opened unprivileged the way ``ps`` does it (memory file ``/dev/null``:
everything below is then read through sysctls); a crash dump is opened from its kernel
image and core file.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import re
import resource
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any, Literal, NamedTuple, cast

from .. import visibility
from ..config import LibkvmConfig
from ..records import (
    ARGV_BYTES,
    HOST_JAIL,
    NO_TTY,
    UNKNOWN_TTY,
    USAGE_COUNTERS,
    USAGE_THREADS,
    Census,
    HostLimits,
    HostUsage,
    Kind,
    LoadAvg,
    OwnUsage,
    Proc,
    SourceError,
    Survey,
    SwapDevice,
    UsageRow,
    UsageSpec,
    census_of,
)
from ..states import (
    DUMP_STATES,
    MAXSLP,
    STATES,
    SZOMB,
    TDF_SINTR,
    freebsd_dump_state,
    freebsd_state,
)
from . import digests, kvm_cdef
from .kvm_cdef import ffi

try:
    from ._procscan import ffi as _gather_ffi  # type: ignore[import-not-found, unused-ignore]
    from ._procscan import lib as _gather_lib  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # built only where pip found a C compiler: the gather is then Python's
    _gather_ffi = _gather_lib = None

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
KERN_PROC_NFDS = 43
CTL_KERN, KERN_PROC = 1, 14
CTL_SYSCTL, CTL_SYSCTL_OIDFMT = 0, 4  # sysctl.oidfmt: a node's kind and format (sys/sysctl.h)
CTL_MAXNAME = 24
CTLTYPE, CTLTYPE_INT, CTLTYPE_STRING, CTLTYPE_UINT = 0xF, 2, 3, 6
_ID_SEPARATORS = re.compile(r"[\s,]+")
P_CONTROLT = 0x00002  # ki_flag: the process has a controlling terminal (sys/sys/proc.h)
O_RDONLY = 0
ERRBUF_SIZE = 2048  # _POSIX2_LINE_MAX, what kvm_openfiles copies into errbuf
NODEV = 2**64 - 1  # (dev_t)-1 in the 64-bit ki_tdev
S_IFCHR = 0o020000
DEVNAME_SIZE = 256  # SPECNAMELEN + 1
MAX_SWAP_DEVICES = 256  # per-device entries asked for; the grand total counts every device
CLOSE_WAIT = 0.5  # seconds close() waits for a call in progress
RECORD_BUFFER = 2048  # bytes: more than any struct kinfo_proc
CP_MODES = ("user", "nice", "system", "interrupt", "idle")
"""kern.cp_time's CPUSTATES in order (CP_USER .. CP_IDLE, sys/sys/resource.h), named as
node_exporter's FreeBSD cpu collector names them."""
VM_STATS = "vm.stats.vm."
VM_COUNTERS = ("v_vm_faults", "v_io_faults", "v_forks", "v_vforks", "v_rforks")
"""vm_cnt counters read for the host's usage: 64-bit (sysctl_handle_vmstat, sys/vm/vm_meter.c)."""

log = logging.getLogger(__name__)

_ARGV_LOCK = threading.Lock()
"""kvm_getargv keeps its buffer and vector in statics of the process, shared by all handles."""


class LibkvmSource:
    """:class:`~kvm_exporter.records.Source` over one ``kvm_t`` handle."""

    name = "libkvm"

    def __init__(self, config: LibkvmConfig) -> None:
        self._lib = kvm_cdef.load(config.library)
        self._libjail = kvm_cdef.load_jail(config.jail_library)
        self._op, self._arg = op_and_argument(config)
        self._by_pid = config.predicate == "pid"
        # KERN_PROC_ALL returns one row per thread even without the modifier.
        self._per_thread = bool(self._op & KERN_PROC_INC_THREAD) or self._op == 0
        # Thread rows carry each live thread's usage (fill_kinfo_thread: rufetchtd); what
        # exited threads used is only in the process's (thread_exit folds it into p_ru):
        # usage is read from process rows of the same selection.
        self._usage_op = self._op & ~KERN_PROC_INC_THREAD or KERN_PROC_OPS["proc"]
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
        native = _record_type(kvm_cdef.native_kinfo_proc_size())
        self._argv_record: Any = ffi.new(native + " *")
        self._timeval = str(dict(ffi.typeof(native).fields)["ki_start"].type.cname)
        """This ABI's struct timeval, which kern.boottime answers."""
        self.states = DUMP_STATES if self.crash_dump else STATES
        try:
            self._pagesize = self._sysctl_int("hw.pagesize")
        except SourceError:
            self.close()
            raise
        self._boottime = (0, 0)
        """kern.boottime (seconds, microseconds) as of the last survey: starts are kept
        relative to it, as a clock step moves it and every ki_start alike."""
        self.usage_spec = USAGE_SPEC._replace(page_size=self._pagesize, start_time=self._epoch)
        if self.crash_dump:
            # No ki_rusage and no ki_start (kvm_proclist leaves them unfilled): memory only;
            # the state is read from ki_stat alone.
            self.usage_spec = self.usage_spec._replace(
                counters=(), decode=_dump_row, state=freebsd_dump_state, start_time=_unknown
            )

    def procs(self) -> list[Proc]:
        """Every process the predicate selects (one record per process)."""
        with self._lock:
            base, count = self._getprocs()
            return self._listed(base, count) if count else []

    def census(self) -> Census:
        """The census of :meth:`procs`, read without a Python object per process."""
        return self._survey(usage=False).census

    def survey(self) -> Survey:
        """The census and every process's usage row, from one kvm_getprocs."""
        return self._survey(usage=True)

    def _survey(self, usage: bool) -> Survey:
        census: Census = {}
        records: Sequence[bytes] = []
        with self._lock:
            # Starts are seconds since boot: ki_start is p_start + boottime
            # (fill_kinfo_proc_only), and a clock step moves boottime (tc_setclock).
            # A crash dump has no ki_start: its rows keep 0.
            if usage and not self.crash_dump:
                boot = self._sysctl_required("kern.boottime", self._timeval)
                self._boottime = (int(boot.tv_sec), int(boot.tv_usec))
            clock = int(time.time() - self._boottime[0] - self._boottime[1] / 1e6)
            base, count = self._getprocs(self._op)
            # Thread rows fold into one process per pid with its visible threads; a crash
            # dump's records need the per-record care of _proc (read once).
            listed = self._per_thread or self.crash_dump
            if listed and count:
                census = census_of(self._listed(base, count))
                if usage and self._per_thread and not self.crash_dump:
                    base, count = self._getprocs(self._usage_op)
            if count and (usage or not listed):
                gather = _gather_of(self._record_type(base), usage, not listed, self.crash_dump)
                # The array belongs to libkvm and the next call frees it: the rows are a copy.
                with memoryview(ffi.buffer(base, count * gather.size)) as array:
                    rows = _gather(array, count, gather, self._boottime)
                if usage:
                    records = _usage_records(rows, gather)
                if not listed:
                    census = self._census_of(*_counted(rows, count, gather))
        if self._per_thread and self.crash_dump:
            records = _fold_thread_usage(records)
        return Survey(census, records, clock)

    def _epoch(self, start: int, fraction: int) -> float:
        """Seconds since the epoch of a row's start (seconds and microseconds since boot)."""
        return self._boottime[0] + start + (self._boottime[1] + fraction) / 1e6

    def _listed(self, base: Any, count: int) -> list[Proc]:
        """The ``count`` records at ``base`` as one record per process (the caller holds the
        lock: the array belongs to libkvm and the next call frees it, so it is copied out
        now). tty names are cached per call: a pts device number can be reused."""
        kinfo = ffi.cast(self._record_type(base) + " *", base)
        ttys: dict[int, str] = {}
        procs = [self._proc(kinfo[i], ttys) for i in range(count)]
        # Live thread rows carry each thread's ki_runtime; a crash dump's carry the process's
        # (p_rux) in every row.
        return _fold_threads(procs, sum_cpu=not self.crash_dump) if self._per_thread else procs

    def _census_of(self, rows: bytes, counts: list[int]) -> Census:
        """The census of process records from their distinct census :data:`_ROW` ``rows``
        and how many records have each (the caller holds the lock): only each distinct row
        becomes a :data:`~kvm_exporter.records.Kind`."""
        distinct = list(_ROW.iter_unpack(rows))
        # A tty name once per device, not per process; devname_r writes self._devname,
        # so the caller holds the lock.
        ttys: dict[int, str] = {}
        for tdev in set(map(itemgetter(0), distinct)):
            ttys[tdev] = self._tty(tdev, ttys)
        kinds: list[Kind] = list(
            zip(
                map(itemgetter(1), distinct),
                map(ttys.__getitem__, map(itemgetter(0), distinct)),
                map(_STATE_WORDS.__getitem__, map(itemgetter(3), distinct)),
                map(itemgetter(2), distinct),
                map(itemgetter(4), distinct),
                strict=True,
            )
        )
        census = dict(zip(kinds, counts, strict=True))
        if len(census) < len(kinds):  # two devices with one name, or both without one
            census = {}
            for kind, n in zip(kinds, counts, strict=True):
                census[kind] = census.get(kind, 0) + n
        return census

    def argv(self, pid: int) -> tuple[str, ...] | None:
        """kvm_getargv (sysctl kern.proc.args.PID): None for a process that has gone, a kernel
        process, a zombie whose arguments were not cached (longer than
        kern.ps_arg_cache_limit), one the exporter may not see, and every process of a crash
        dump (a core holds no user memory to read arguments from). A zombie keeps its cached
        arguments until it is reaped (sysctl_kern_proc_args returns p_args before looking at
        P_WEXIT), so it is named as it was alive."""
        if self.crash_dump:
            return None
        record = self._argv_record
        record.ki_pid = pid  # the only field kvm_getargv reads
        with self._lock, _ARGV_LOCK:
            vector = self._lib.kvm_getargv(self._handle(), record, ARGV_BYTES)
            if vector == ffi.NULL:
                return None
            args: list[bytes] = []
            while vector[len(args)] != ffi.NULL:
                args.append(ffi.string(vector[len(args)]))
        return tuple(a.decode("utf-8", "surrogateescape") for a in args)

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
        # A dead kernel's physmem would need its symbol and page size: left out.
        memory = None if self.crash_dump else self._physmem()
        return HostLimits(cpus=cpus, max_procs=procs, max_threads=threads, memory_bytes=memory)

    def own_usage(self) -> OwnUsage:
        """The exporter's own process, from its kinfo_proc (sysctl kern.proc.pid.<pid>).

        Read by sysctl, not through the libkvm handle: it is this running process even when
        the handle is a crash dump, and it leaves the handle to the polls. Open descriptors
        come from kern.proc.nfds (None where the kernel lacks that node), the limit from
        getrlimit(RLIMIT_NOFILE).
        """
        pid = os.getpid()
        record = ffi.new("char[]", RECORD_BUFFER)
        size = ffi.new("size_t *", RECORD_BUFFER)
        if self._sysctl([CTL_KERN, KERN_PROC, KERN_PROC_OPS["pid"], pid], record, size) != 0:
            raise SourceError(f"sysctl kern.proc.pid.{pid}: {os.strerror(ffi.errno)}")
        structsize = int(ffi.cast("int *", record)[0])
        if size[0] < structsize:
            raise SourceError(f"sysctl kern.proc.pid.{pid}: {size[0]} bytes, not {structsize}")
        kp = ffi.cast(_record_type(structsize) + " *", record)[0]
        ru = kp.ki_rusage
        nfds = ffi.new("int *")
        nfds_size = ffi.new("size_t *", ffi.sizeof("int"))
        known = self._sysctl([CTL_KERN, KERN_PROC, KERN_PROC_NFDS, 0], nfds, nfds_size) == 0
        return OwnUsage(
            cpu_seconds=ru.ru_utime.tv_sec
            + ru.ru_stime.tv_sec
            + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6,
            resident_bytes=kp.ki_rssize * self._pagesize,
            virtual_bytes=kp.ki_size,
            start_time=kp.ki_start.tv_sec + kp.ki_start.tv_usec / 1e6,
            open_fds=int(nfds[0]) if known else None,
            max_fds=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        )

    def jail_name(self, jid: int) -> str:
        """jail_getname(3): jail_get(2) by jid, which needs no privilege and sees the jails
        below the caller's own; ``host`` for 0 (inside a jail, ki_jid is 0 for the caller's
        own jail). A jail the reader cannot name (gone, libjail missing, a crash dump's: the
        running host's jails are not the dump's) is named by its jid."""
        if jid == 0:
            return HOST_JAIL
        if self._libjail is None or self.crash_dump:
            return str(jid)
        name = self._libjail.jail_getname(jid)
        if name == ffi.NULL:
            return str(jid)
        try:
            return _text(name)
        finally:
            self._lib.free(name)

    def visibility(self) -> dict[str, bool]:
        """The security sysctls of the running kernel; none for a crash dump, whose
        processes libkvm reads from kernel memory with no p_cansee()."""
        if self.crash_dump:
            return {}
        return visibility.freebsd(self._sysctl_if_any, self._sysctl_ids)

    def _physmem(self) -> int | None:
        """hw.physmem, an unsigned long; None if the sysctl cannot be read."""
        value = ffi.new("unsigned long *")
        size = ffi.new("size_t *", ffi.sizeof("unsigned long"))
        if self._lib.sysctlbyname(b"hw.physmem", value, size, ffi.NULL, 0) != 0:
            return None
        return int(value[0])

    def _sysctl(self, mib: list[int], value: Any, size: Any) -> int:
        return int(self._lib.sysctl(ffi.new("int[]", mib), len(mib), value, size, ffi.NULL, 0))

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

    def _getprocs(self, op: int | None = None) -> tuple[Any, int]:
        """kvm_getprocs of ``op`` (the configured one by default; the caller holds the lock):
        the array and its record count.

        The array is libkvm's until its next call; a pid that has gone is no records.
        """
        kd = self._handle()
        self._clear_error(kd)
        count = ffi.new("int *", -1)
        base = self._lib.kvm_getprocs(kd, self._op if op is None else op, self._arg, count)
        if base == ffi.NULL:
            if ffi.errno == errno.ESRCH and self._by_pid:
                return base, 0  # KERN_PROC_PID of a process that has gone, as ps treats it
            if self.crash_dump and count[0] == 0 and not _text(self._lib.kvm_geterr(kd)):
                return base, 0  # libkvm frees a dead kernel's empty array: NULL, no error
            raise self._failure("kvm_getprocs", kd)
        return base, int(count[0])

    def _record_type(self, base: Any) -> str:
        """The cffi type of the records at ``base``, from the first one's ki_structsize.

        A crash dump's records say 0 (kvm_proclist sets it, then clears the record): they
        are libkvm's own, native layout, since it refuses a core of another machine.
        """
        structsize = int(ffi.cast("int *", base)[0])
        if structsize == 0 and self.crash_dump:
            structsize = kvm_cdef.native_kinfo_proc_size()
        return _record_type(structsize)

    def _clear_error(self, kd: Any) -> None:
        # libkvm never clears its errbuf, so empty it before a call: a failure's text is
        # then that call's own, and an empty text means the call set none.
        self._lib.kvm_geterr(kd)[0] = b"\0"

    def _failure(self, call: str, kd: Any) -> SourceError:
        code = ffi.errno
        reason = _text(self._lib.kvm_geterr(kd)) or (os.strerror(code) if code else "no reason")
        return SourceError(f"{call} failed: {reason}")

    def _sysctl_int(self, name: str) -> int:
        return int(self._sysctl_required(name, "int")[0])

    def _sysctl_required(self, name: str, ctype: str) -> Any:
        """:meth:`_sysctl_value`, a missing node an error."""
        value = self._sysctl_value(name, ctype)
        if value is None:
            raise SourceError(f"sysctl {name}: {os.strerror(errno.ENOENT)}")
        return value

    def _sysctl_if_any(self, name: str) -> int | None:
        """The ``int`` sysctl ``name``; None where the kernel has no such node (ENOENT)."""
        value = self._sysctl_value(name, "int")
        return None if value is None else int(value[0])

    def _sysctl_ids(self, name: str) -> tuple[int, ...] | None:
        """Sysctl ``name`` as the ids it lists, read as the kernel says the node is written
        (its kind in sysctl.oidfmt, as sysctl(8) prints by): ints, one id per 4 bytes
        (``mac_seeotheruids.c``'s SYSCTL_UINT specificgid, one gid), or a text of decimal ids
        separated by commas or blanks (a CTLTYPE_STRING list); None where the kernel has no
        such node (ENOENT). Any other kind or text is refused, not guessed at."""
        mib = ffi.new("int[]", CTL_MAXNAME)
        length = ffi.new("size_t *", CTL_MAXNAME)
        if self._lib.sysctlnametomib(name.encode(), mib, length) != 0:
            if ffi.errno == errno.ENOENT:
                return None
            raise SourceError(f"sysctl {name}: {os.strerror(ffi.errno)}")
        oidfmt = [CTL_SYSCTL, CTL_SYSCTL_OIDFMT, *mib[0 : length[0]]]
        kind = _read_sized(name, lambda value, size: self._sysctl(oidfmt, value, size))
        value = _read_sized(
            name,
            lambda value, size: self._lib.sysctlbyname(name.encode(), value, size, ffi.NULL, 0),
        )
        ctltype = struct.unpack_from("=I", kind)[0] & CTLTYPE if len(kind) >= 4 else None
        if ctltype == CTLTYPE_STRING:
            text = value.split(b"\0", 1)[0].decode("ascii", "replace")
            ids = [word for word in _ID_SEPARATORS.split(text) if word]
            if all(word.isdigit() for word in ids):
                return tuple(int(word) for word in ids)
            raise SourceError(f"sysctl {name}: {text!r} is not a list of ids")
        if ctltype in (CTLTYPE_INT, CTLTYPE_UINT) and value and len(value) % 4 == 0:
            return struct.unpack(f"={len(value) // 4}I", value)
        raise SourceError(f"sysctl {name}: neither ints nor a text of ids (kind {ctltype})")

    def _sysctl_value(self, name: str, ctype: str) -> Any:
        """sysctlbyname ``name`` read as one ``ctype``, as a pointer that owns it, or None where
        the kernel has no such node (ENOENT): the kernel must answer exactly its size
        (another kernel's layout is refused, not misread)."""
        value = ffi.new(ffi.getctype(ctype, "*"))
        size = ffi.new("size_t *", ffi.sizeof(ctype))
        if self._lib.sysctlbyname(name.encode(), value, size, ffi.NULL, 0) != 0:
            if ffi.errno == errno.ENOENT:
                return None
            raise SourceError(f"sysctl {name}: {os.strerror(ffi.errno)}")
        if size[0] != ffi.sizeof(ctype):
            raise SourceError(
                f"sysctl {name}: the kernel answered {size[0]} bytes, not the"
                f" {ffi.sizeof(ctype)} of {ctype}"
            )
        return value

    def host_usage(self) -> HostUsage:
        """CPU time per mode (kern.cp_time in stathz ticks of kern.clockrate), page faults
        (vm.stats.vm.v_vm_faults, of which v_io_faults needed I/O: major) and forks
        (v_forks + v_vforks + v_rforks). A crash dump's are per-CPU counters of the dead
        kernel (DPCPU cp_time, counter(9)): not read."""
        if self.crash_dump:
            return HostUsage({}, {}, None)
        with self._lock:
            cp_time = self._sysctl_required("kern.cp_time", f"long[{len(CP_MODES)}]")
            ticks = list(cp_time[0])
            clock = self._sysctl_required("kern.clockrate", "struct clockinfo")
            counts = {
                name: int(self._sysctl_required(VM_STATS + name, "uint64_t")[0])
                for name in VM_COUNTERS
            }
        stathz = clock.stathz or clock.hz  # sysctl_kern_clockrate gives hz without stathz
        if stathz <= 0:
            raise SourceError(f"sysctl kern.clockrate: no clock rate (hz {clock.hz})")
        faults, major = counts["v_vm_faults"], counts["v_io_faults"]
        return HostUsage(
            cpu_seconds={mode: ticks[i] / stathz for i, mode in enumerate(CP_MODES)},
            page_faults={"minor": faults - major, "major": major},
            forks=counts["v_forks"] + counts["v_vforks"] + counts["v_rforks"],
        )

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
        if self.crash_dump:
            # What libkvm's kvm_proclist leaves unfilled is not data: no ki_tdflags,
            # ki_slptime or ki_start, and ki_tdev is NODEV even with a terminal (P_CONTROLT
            # in ki_flag, which is 0 for a zombie). tests/fakekvm/README.md has the table.
            has_tty = kp.ki_stat == SZOMB or kp.ki_flag & P_CONTROLT
            tty = UNKNOWN_TTY if has_tty else NO_TTY
            state = freebsd_dump_state(kp.ki_stat)
            start: float | None = None
        else:
            tty = self._tty(kp.ki_tdev, ttys)
            state = freebsd_state(kp.ki_stat, kp.ki_tdflags, kp.ki_slptime)
            start = kp.ki_start.tv_sec + kp.ki_start.tv_usec / 1e6
        return Proc(
            pid=kp.ki_pid,
            ppid=kp.ki_ppid,
            uid=kp.ki_uid,
            ruid=kp.ki_ruid,
            tty=tty,
            state=state,
            comm=_text(kp.ki_comm),
            threads=kp.ki_numthreads,
            rss_bytes=kp.ki_rssize * self._pagesize,
            vsize_bytes=kp.ki_size,
            cpu_seconds=kp.ki_runtime / 1e6,
            start_time=start,
            jid=kp.ki_jid,
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


def _read_sized(name: str, read: Callable[[Any, Any], int]) -> bytes:
    """The bytes a sysctl answers, ``read(NULL, size)`` asked for their size first."""
    size = ffi.new("size_t *", 0)
    if read(ffi.NULL, size) == 0:
        value = ffi.new("char[]", max(size[0], 1))
        if read(value, size) == 0:
            return bytes(ffi.buffer(value, size[0]))
    raise SourceError(f"sysctl {name}: {os.strerror(ffi.errno)}")


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
    if ffi.sizeof(record_type) != structsize:
        raise SourceError(
            f"{record_type} is declared {ffi.sizeof(record_type)} bytes, the kernel's"
            f" records {structsize}: the binding's declaration is wrong"
        )
    return record_type


def op_and_argument(config: LibkvmConfig) -> tuple[int, int]:
    """The kvm_getprocs op and int argument for ``config``, as the kernel will read them.

    Only ops with a sysctl node are sent: ``sysctl_kern_proc`` has a thread variant of
    every predicate but ``all``, which already returns one row per thread, so ``all`` with
    ``threads`` sends plain KERN_PROC_ALL. The argument is a C int that the kernel casts:
    to uid_t for uid and ruid (all 2**32 uids), to dev_t for tty (sign-extended).
    Raises :class:`SourceError` for what the kernel cannot be asked; loads no library, so a
    configuration check can call it.
    """
    predicate, argument = config.predicate, config.argument
    if predicate in ("proc", "all"):
        threads = config.threads and predicate == "proc"
        return KERN_PROC_OPS[predicate] | (KERN_PROC_INC_THREAD if threads else 0), 0
    if argument is None:
        raise SourceError(
            f"libkvm.predicate {predicate!r} selects by a number: set libkvm.argument"
        )
    if predicate == "tty" and config.core is not None:
        raise SourceError(
            "libkvm.predicate 'tty' cannot select from a crash dump: libkvm reads no terminal"
            " device from a dump (every process's ki_tdev is NODEV)"
        )
    wraps = {"uid": 2**32, "ruid": 2**32, "tty": 2**64}.get(predicate)
    if wraps is not None and wraps - 2**31 <= argument < wraps:
        argument -= wraps  # the int whose cast gives this uid or device number
    if not -(2**31) <= argument < 2**31:
        what = {
            "uid": "a uid from 0 to 4294967295",
            "ruid": "a uid from 0 to 4294967295",
            "tty": "a device number below 2**31 or from 2**64 - 2**31 (the kernel"
            " sign-extends its int argument to a dev_t)",
        }.get(predicate, "a number that fits kvm_getprocs' int")
        raise SourceError(f"libkvm.argument {config.argument} is out of range: expected {what}")
    op = KERN_PROC_OPS[predicate] | (KERN_PROC_INC_THREAD if config.threads else 0)
    return op, argument


_ROW = struct.Struct("=QIiB3xi")
"""A census row: ki_tdev, ki_uid, ki_numthreads, the state (an index of
:data:`_STATE_WORDS`) and ki_jid; 24 bytes, every field aligned in it."""
_IntFormat = Literal["B", "i", "I", "q", "Q"]


def _state_tables() -> tuple[bytes, bytes, bytes, tuple[str, ...]]:
    """Translation tables that give each record its state word at C speed.

    ``freebsd_state`` reads ki_stat, the TDF_SINTR bit of ki_tdflags (0x8, in its low
    byte) and whether ki_slptime reaches MAXSLP, nothing else. Per record the gather
    computes ``stat_code[ki_stat] | sintr[low byte of ki_tdflags] | slept`` (slept: 1 if
    ki_slptime >= MAXSLP), where ``stat_code`` gives every ki_stat value that behaves alike
    one code (a multiple of 4); ``word_of[that]`` is then the state's index in ``words``.
    The tables come from ``freebsd_state`` itself, so they cannot disagree with it.
    """
    if not 0 < TDF_SINTR < 0x100:
        raise AssertionError("the gather reads TDF_SINTR from the low byte of ki_tdflags")
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

_USAGE_ROW = struct.Struct("=i4xqqIiqQiiB7x20s4x20q")
"""A usage record as gathered (the layout of records.USAGE_*), every field aligned to its width;
the start is seconds and microseconds since boot, the state an index of :data:`_STATE_WORDS`
(a crash dump's: ki_stat), comm is ki_comm; ki_rusage's counters, then ki_rusage_ch's."""


def _unknown(*_: int) -> None:
    return None


USAGE_SPEC = UsageSpec(
    page_size=0,  # hw.pagesize, set per source
    counters=(
        ("cpu", "user", 1.0),
        ("cpu", "user", 1e-6),
        ("cpu", "system", 1.0),
        ("cpu", "system", 1e-6),
        ("page_faults", "minor", 1.0),
        ("page_faults", "major", 1.0),
        ("context_switches", "voluntary", 1.0),
        ("context_switches", "involuntary", 1.0),
        ("block_operations", "in", 1.0),
        ("block_operations", "out", 1.0),
    ),
    decode=_USAGE_ROW.unpack,
    state=_STATE_WORDS.__getitem__,
    start_time=_unknown,  # per source: LibkvmSource._epoch adds the boot time it last read
    reaped=frozenset({"cpu"}),
)
"""FreeBSD usage rows: ki_rusage's times (seconds, microseconds) and counts (ki_rusage_ch's
follow: fill_kinfo_proc_only fills only its times, by calccru; its counts stay 0)."""

_STATE = ("state",)
"""In a column list: the record's state (an index of :data:`_STATE_WORDS`), one byte."""
_SINCE_SEC, _SINCE_USEC = "since_sec", "since_usec"
"""As a column's format: a timeval's seconds and microseconds less the boot time, 64-bit."""
_RUSAGE_COLUMNS = (
    ("ru_utime", "tv_sec"),
    ("ru_utime", "tv_usec"),
    ("ru_stime", "tv_sec"),
    ("ru_stime", "tv_usec"),
    ("ru_minflt",),
    ("ru_majflt",),
    ("ru_nvcsw",),
    ("ru_nivcsw",),
    ("ru_inblock",),
    ("ru_oublock",),
)
_Columns = tuple[tuple[tuple[str, ...], int, str], ...]
_USAGE_COLUMNS: _Columns = (
    (("ki_pid",), 0, "i"),
    (("ki_start", "tv_sec"), 8, _SINCE_SEC),
    (("ki_start", "tv_usec"), 16, _SINCE_USEC),
    (("ki_uid",), 24, "I"),
    (("ki_jid",), 28, "i"),
    (("ki_rssize",), 32, "q"),
    (("ki_size",), 40, "Q"),
    (("ki_ppid",), 48, "i"),
    (("ki_numthreads",), 52, "i"),
    (_STATE, 56, "B"),
    (("ki_comm",), 64, "20s"),
    *(
        ((rusage, *path), 88 + 8 * i, "q")
        for i, (rusage, path) in enumerate(
            (rusage, path) for rusage in ("ki_rusage", "ki_rusage_ch") for path in _RUSAGE_COLUMNS
        )
    ),
)
"""Each field of a :data:`_USAGE_ROW`: where it comes from in a kinfo_proc (a path of
member names), its offset in the row and its struct format there."""
_CENSUS_COLUMNS: _Columns = (
    (("ki_tdev",), 0, "Q"),
    (("ki_uid",), 8, "I"),
    (("ki_numthreads",), 12, "i"),
    (_STATE, 16, "B"),
    (("ki_jid",), 20, "i"),
)
"""Each field of a census :data:`_ROW`, as :data:`_USAGE_COLUMNS` for a usage row."""
_FORMATS: dict[str, str] = {
    "uint8_t": "B",
    "int32_t": "i",
    "uint32_t": "I",
    "int64_t": "q",
    "uint64_t": "Q",
}


class _Field(NamedTuple):
    """One field of a gathered row: read as the struct format ``read`` at ``offset`` of a
    record, written as ``write`` at ``at`` of the row: the same bytes, or an integer widened
    to 64 bits; ``read`` ``"state"`` writes the record's state (one byte)."""

    offset: int
    at: int
    read: str
    write: str


class _Gather(NamedTuple):
    """How to gather rows of ``row`` bytes from records of ``size`` bytes: the one
    description that the compiled and the Python gather read."""

    size: int
    row: int
    fields: tuple[_Field, ...]
    state: tuple[int, int, int]
    """Offsets of ki_stat, of the low byte of ki_tdflags (TDF_SINTR) and of ki_slptime."""
    c_fields: Any
    """The fields as ``struct kvm_field[]`` for ``kvm_gather``, None without ``_procscan``."""
    c_states: Any
    """``struct kvm_states`` for ``kvm_gather``, None without ``_procscan``."""


_GATHERS: dict[tuple[str, bool, bool, bool], _Gather] = {}


def _gather_of(record_type: str, usage: bool, census: bool, dump: bool) -> _Gather:
    """The gather of ``record_type`` into usage records, census rows or both side by side
    (a usage record, then a census row), from its cffi declaration (once per kind). A crash
    dump's usage state is ki_stat as it is."""
    key = (record_type, usage, census, dump)
    gather = _GATHERS.get(key)
    if gather is not None:
        return gather
    columns: list[tuple[tuple[str, ...], int, str]] = []
    if usage:
        columns += (
            (("ki_stat",) if path == _STATE and dump else path, at, fmt)
            for path, at, fmt in _USAGE_COLUMNS
        )
    if census:
        shift = _USAGE_ROW.size if usage else 0
        columns += ((path, at + shift, fmt) for path, at, fmt in _CENSUS_COLUMNS)
    fields = tuple(_field(record_type, *column) for column in columns)
    tdflags = dict(ffi.typeof(record_type).fields)["ki_tdflags"]
    low = 0 if sys.byteorder == "little" else ffi.sizeof(tdflags.type) - 1
    state = (
        _field(record_type, ("ki_stat",), 0, "B").offset,
        int(tdflags.offset) + low,
        _field(record_type, ("ki_slptime",), 0, "I").offset,
    )
    row = (_USAGE_ROW.size if usage else 0) + (_ROW.size if census else 0)
    c_fields, c_states = _c_gather(fields, state)
    gather = _Gather(ffi.sizeof(record_type), row, fields, state, c_fields, c_states)
    _GATHERS[key] = gather
    return gather


def _field(record_type: str, path: tuple[str, ...], at: int, write: str) -> _Field:
    """The field of ``record_type`` at ``path`` to write as ``write`` at ``at`` of a row."""
    if path == _STATE:
        return _Field(0, at, "state", write)
    ctype, offset = ffi.typeof(record_type), 0
    for name in path:
        member = dict(ctype.fields)[name]
        offset, ctype = offset + member.offset, member.type
    if ctype.kind == "array":
        read = f"{ffi.sizeof(ctype)}s"
    else:
        read = _FORMATS.get(ctype.cname, ctype.cname)
    widens = read in _FORMATS.values() and write in "qQ" and struct.calcsize(read) < 8
    since = write in (_SINCE_SEC, _SINCE_USEC) and read in "iq"
    if read != write and not widens and not since:
        name = ".".join(path)
        raise SourceError(f"{record_type}.{name} is {ctype.cname}: it cannot be read as {write!r}")
    return _Field(int(offset), at, read, write)


def _c_gather(fields: tuple[_Field, ...], state: tuple[int, int, int]) -> tuple[Any, Any]:
    """``fields`` and the state tables as ``kvm_gather`` reads them (None, None without it)."""
    if _gather_ffi is None:
        return None, None
    table = _gather_ffi.new("struct kvm_field[]", len(fields))
    for entry, field in zip(table, fields, strict=True):
        entry.src, entry.dst = field.offset, field.at
        if field.read == "state":
            entry.width, entry.kind = 1, _gather_ffi.integer_const("KVM_STATE")
            continue
        entry.width = struct.calcsize(field.read)
        if field.write == _SINCE_SEC:
            entry.kind = _gather_ffi.integer_const("KVM_SINCE_SEC")
        elif field.write == _SINCE_USEC:
            entry.kind = _gather_ffi.integer_const("KVM_SINCE_USEC")
        elif field.read == field.write:
            entry.kind = _gather_ffi.integer_const("KVM_COPY")
        elif field.read.islower():
            entry.kind = _gather_ffi.integer_const("KVM_SIGNED")
        else:
            entry.kind = _gather_ffi.integer_const("KVM_UNSIGNED")
    states = _gather_ffi.new("struct kvm_states *")
    states.stat, states.tdflags_low, states.slptime = state
    states.maxslp = MAXSLP
    states.stat_code, states.sintr, states.word_of = list(_STAT_CODE), list(_SINTR), list(_WORD_OF)
    return table, states


def _gather(
    records: memoryview, count: int, gather: _Gather, boot: tuple[int, int] = (0, 0)
) -> bytearray:
    """One row per record of ``records`` (``count`` records), in one compiled pass over them
    when ``_procscan`` is there, else field by field with strided memoryview copies: the
    same bytes either way, padding zero. Starts are written less ``boot`` (a timeval)."""
    rows = bytearray(count * gather.row)
    if count == 0:
        return rows
    if _gather_lib is not None and gather.c_fields is not None:
        c_states = _gather_ffi.new("struct kvm_states *")  # the shared tables, this boot
        _gather_ffi.memmove(c_states, gather.c_states, _gather_ffi.sizeof("struct kvm_states"))
        c_states.boot_sec, c_states.boot_usec = boot
        _gather_lib.kvm_gather(
            _gather_ffi.from_buffer(records),
            count,
            gather.size,
            gather.c_fields,
            len(gather.fields),
            c_states,
            _gather_ffi.from_buffer(rows),
            gather.row,
        )
        return rows
    out = memoryview(rows)
    states: bytes | None = None
    for field in gather.fields:
        if field.read == "state":
            if states is None:  # once for the census and the usage alike
                states = _state_codes(records, count, gather)
            out[field.at :: gather.row] = states
        elif field.write in (_SINCE_SEC, _SINCE_USEC):
            _write_since(
                out,
                gather.row,
                field,
                _column(records, count, gather.size, field.offset, cast(_IntFormat, field.read)),
                boot,
            )
        elif field.read.endswith("s"):  # bytes as they are: a strided copy per byte
            for i in range(struct.calcsize(field.read)):
                out[field.at + i :: gather.row] = records[field.offset + i :: gather.size][:count]
        else:
            read, write = cast(_IntFormat, field.read), cast(_IntFormat, field.write)
            column = _column(records, count, gather.size, field.offset, read)
            if read != write:  # a 32-bit long: widen it
                column = array.array(write, column)
            width = struct.calcsize(write)
            out.cast(write)[field.at // width :: gather.row // width] = column
    return rows


def _write_since(
    out: memoryview, row: int, field: _Field, column: Any, boot: tuple[int, int]
) -> None:
    """Write a start's seconds (or microseconds, borrowing a second from the seconds just
    before them where ``boot`` took them below 0) less ``boot``, wrapping at 64 bits: what
    ``kvm_gather`` does."""
    words = out.cast("q")
    at, step = field.at // 8, row // 8
    if field.write == _SINCE_SEC:
        words[at::step] = array.array("q", [_wrap(value - boot[0]) for value in column])
        return
    borrow = [value >= 0 and value - boot[1] < 0 for value in column]
    seconds = words[at - 1 :: step]
    seconds[:] = array.array("q", [_wrap(s - b) for s, b in zip(seconds, borrow, strict=True)])
    words[at::step] = array.array(
        "q", [_wrap(v - boot[1] + 1_000_000 * b) for v, b in zip(column, borrow, strict=True)]
    )


def _wrap(value: int) -> int:
    """``value`` as a two's complement int64 (C's wrapping arithmetic)."""
    return (value + 2**63) % 2**64 - 2**63


def _usage_records(rows: bytearray, gather: _Gather) -> Sequence[bytes]:
    """The usage record of each row: its first :data:`_USAGE_ROW` bytes (a census row may
    follow)."""
    return digests.records(rows, len(rows) // gather.row, gather.row, _USAGE_ROW.size)


def _counted(rows: bytearray, count: int, gather: _Gather) -> tuple[bytes, list[int]]:
    """The census rows (the last :data:`_ROW` bytes of each row) counted: each distinct one
    once, in the order first seen, and how many rows have it."""
    at = gather.row - _ROW.size
    if _gather_lib is None:
        counter = Counter(map(itemgetter(0), struct.Struct(f"{at}x{_ROW.size}s").iter_unpack(rows)))
        return b"".join(counter), list(counter.values())
    keys = bytearray(count * _ROW.size)
    counts = _gather_ffi.new("uint32_t[]", count)
    n = _gather_lib.kvm_count(
        _gather_ffi.from_buffer(rows),
        count,
        gather.row,
        at,
        _ROW.size,
        _gather_ffi.from_buffer(keys),
        counts,
    )
    if n < 0:
        raise MemoryError("kvm_count: out of memory")
    return bytes(keys[: n * _ROW.size]), list(counts[0:n])


def _column(records: memoryview, count: int, size: int, offset: int, fmt: _IntFormat) -> Any:
    """The field at ``offset`` of each of ``count`` records of ``size`` bytes: one strided
    view, no copy."""
    width = struct.calcsize(fmt)
    return records[offset : offset + (count - 1) * size + width].cast(fmt)[:: size // width]


def _state_codes(records: memoryview, count: int, gather: _Gather) -> bytes:
    """Each record's state as an index of :data:`_STATE_WORDS`, from translation tables and
    one OR of the columns as integers: no Python object per record."""
    stat, tdflags_low, slptime = gather.state

    def column(offset: int, fmt: _IntFormat) -> Any:
        return _column(records, count, gather.size, offset, fmt)

    def bits(column: bytes) -> int:
        return int.from_bytes(column, "little")

    slept = bytes(map(MAXSLP.__le__, column(slptime, "I").tolist()))
    states = (
        bits(column(stat, "B").tobytes().translate(_STAT_CODE))
        | bits(column(tdflags_low, "B").tobytes().translate(_SINTR))
        | bits(slept)
    )
    return states.to_bytes(count, "little").translate(_WORD_OF)


def _fold_thread_usage(records: Sequence[bytes]) -> list[bytes]:
    """One usage record per process from a crash dump's thread rows (which carry no
    counters): the first row, with the number of rows as its threads."""
    first: dict[int, list[Any]] = {}
    for row in map(_USAGE_ROW.unpack, records):
        kept = first.get(row[0])
        if kept is None:
            first[row[0]] = [*row[:USAGE_THREADS], 1, *row[USAGE_THREADS + 1 :]]
        else:
            kept[USAGE_THREADS] += 1
    return [_USAGE_ROW.pack(*row) for row in first.values()]


def _dump_row(record: bytes) -> UsageRow:
    """A crash dump's usage row: no counters (kvm_proclist fills no ki_rusage)."""
    return _USAGE_ROW.unpack(record)[:USAGE_COUNTERS]


def _fold_threads(rows: list[Proc], sum_cpu: bool) -> list[Proc]:
    """One record per process from thread rows: the first row, with its visible threads,
    and with ``sum_cpu`` the CPU time of all its rows (each row then has its thread's)."""
    first: dict[int, Proc] = {}
    threads: Counter[int] = Counter()
    cpu: dict[int, float] = {}
    for row in rows:
        first.setdefault(row.pid, row)
        threads[row.pid] += 1
        cpu[row.pid] = cpu.get(row.pid, 0.0) + row.cpu_seconds
    return [
        proc._replace(threads=threads[pid], cpu_seconds=cpu[pid] if sum_cpu else proc.cpu_seconds)
        for pid, proc in first.items()
    ]


def _swap_name(devname: str) -> str:
    # Swap over NFS has no device; libkvm names it "[NFS swap]".
    return devname if devname.startswith("[") else "/dev/" + devname


def _path(value: str | None) -> Any:
    return ffi.NULL if value is None else os.fsencode(value)


def _text(chars: Any) -> str:
    return str(ffi.string(chars).decode("utf-8", "replace"))
