"""cffi declarations for FreeBSD's libkvm, and nothing else.

ABI mode (``ffi.dlopen``), not API mode: API mode compiles a C extension at install time,
which needs a compiler and FreeBSD's headers on every host, while ABI mode needs only cffi's
prebuilt backend, so ``pip install`` works on a bare FreeBSD system. The price is that cffi
cannot check these declarations against the headers; the layouts are therefore spelled out
with fixed-width types from the verified ABI facts, proven by ``tests/test_kvm_layout.py``,
and checked at run time against the kernel's own ``ki_structsize``.

``struct kinfo_proc`` is declared once per kernel ABI (LP64, i386, armv7), all generated
from one field table, so a 64-bit host can describe 32-bit records and tests can prove every
layout on any machine.
"""

from __future__ import annotations

import platform
from typing import Any

import cffi  # type: ignore[import-untyped]

from ..records import SourceError

# Width-dependent types per ABI. ``ptr`` is a kernel address, never dereferenced here.
_ABI_TYPES: dict[str, dict[str, str]] = {
    "lp64": {"long": "int64_t", "ulong": "uint64_t", "ptr": "uint64_t", "time": "int64_t"},
    "i386": {"long": "int32_t", "ulong": "uint32_t", "ptr": "uint32_t", "time": "int32_t"},
    # armv7: 32-bit long and pointers, but a 64-bit time_t.
    "armv7": {"long": "int32_t", "ulong": "uint32_t", "ptr": "uint32_t", "time": "int64_t"},
}

# struct kinfo_proc in declaration order (sys/sys/user.h, FreeBSD 12 and later).
# Types: fixed-width C types, or ABI words from _ABI_TYPES, or timeval/rusage (per ABI).
_KINFO_PROC_FIELDS: tuple[tuple[str, str], ...] = (
    ("int32_t", "ki_structsize"),
    ("int32_t", "ki_layout"),
    ("ptr", "ki_args"),
    ("ptr", "ki_paddr"),
    ("ptr", "ki_addr"),
    ("ptr", "ki_tracep"),
    ("ptr", "ki_textvp"),
    ("ptr", "ki_fd"),
    ("ptr", "ki_vmspace"),
    ("ptr", "ki_wchan"),
    ("int32_t", "ki_pid"),
    ("int32_t", "ki_ppid"),
    ("int32_t", "ki_pgid"),
    ("int32_t", "ki_tpgid"),
    ("int32_t", "ki_sid"),
    ("int32_t", "ki_tsid"),
    ("int16_t", "ki_jobc"),
    ("int16_t", "ki_spare_short1"),
    ("uint32_t", "ki_tdev_freebsd11"),
    ("uint32_t", "ki_siglist[4]"),
    ("uint32_t", "ki_sigmask[4]"),
    ("uint32_t", "ki_sigignore[4]"),
    ("uint32_t", "ki_sigcatch[4]"),
    ("uint32_t", "ki_uid"),
    ("uint32_t", "ki_ruid"),
    ("uint32_t", "ki_svuid"),
    ("uint32_t", "ki_rgid"),
    ("uint32_t", "ki_svgid"),
    ("int16_t", "ki_ngroups"),
    ("int16_t", "ki_spare_short2"),
    ("uint32_t", "ki_groups[16]"),
    ("ulong", "ki_size"),
    ("long", "ki_rssize"),
    ("long", "ki_swrss"),
    ("long", "ki_tsize"),
    ("long", "ki_dsize"),
    ("long", "ki_ssize"),
    ("uint16_t", "ki_xstat"),
    ("uint16_t", "ki_acflag"),
    ("uint32_t", "ki_pctcpu"),
    ("uint32_t", "ki_estcpu"),
    ("uint32_t", "ki_slptime"),
    ("uint32_t", "ki_swtime"),
    ("uint32_t", "ki_cow"),
    ("uint64_t", "ki_runtime"),
    ("timeval", "ki_start"),
    ("timeval", "ki_childtime"),
    ("long", "ki_flag"),
    ("long", "ki_kiflag"),
    ("int32_t", "ki_traceflag"),
    # ki_stat, ki_lock and ki_rqindex are C char; uint8_t makes cffi return ints.
    ("uint8_t", "ki_stat"),
    ("int8_t", "ki_nice"),
    ("uint8_t", "ki_lock"),
    ("uint8_t", "ki_rqindex"),
    ("uint8_t", "ki_oncpu_old"),
    ("uint8_t", "ki_lastcpu_old"),
    ("char", "ki_tdname[17]"),
    ("char", "ki_wmesg[9]"),
    ("char", "ki_login[18]"),
    ("char", "ki_lockname[9]"),
    ("char", "ki_comm[20]"),
    ("char", "ki_emul[17]"),
    ("char", "ki_loginclass[18]"),
    ("char", "ki_moretdname[4]"),
    ("char", "ki_sparestrings[46]"),
    ("int32_t", "ki_spareints[2]"),
    ("uint64_t", "ki_tdev"),
    ("int32_t", "ki_oncpu"),
    ("int32_t", "ki_lastcpu"),
    ("int32_t", "ki_tracer"),
    ("int32_t", "ki_flag2"),
    ("int32_t", "ki_fibnum"),
    ("uint32_t", "ki_cr_flags"),
    ("int32_t", "ki_jid"),
    ("int32_t", "ki_numthreads"),
    ("int32_t", "ki_tid"),
    ("uint8_t", "ki_pri[4]"),
    ("rusage", "ki_rusage"),
    ("rusage", "ki_rusage_ch"),
    ("ptr", "ki_pcb"),
    ("ptr", "ki_kstack"),
    ("ptr", "ki_udata"),
    ("ptr", "ki_tdaddr"),
    ("ptr", "ki_pd"),
    ("ptr", "ki_spareptrs[5]"),
    ("long", "ki_sparelongs[12]"),
    ("long", "ki_sflag"),
    ("long", "ki_tdflags"),
)

_RUSAGE_LONGS = (
    "ru_maxrss",
    "ru_ixrss",
    "ru_idrss",
    "ru_isrss",
    "ru_minflt",
    "ru_majflt",
    "ru_nswap",
    "ru_inblock",
    "ru_oublock",
    "ru_msgsnd",
    "ru_msgrcv",
    "ru_nsignals",
    "ru_nvcsw",
    "ru_nivcsw",
)


def _abi_cdef(abi: str) -> str:
    types = dict(_ABI_TYPES[abi], timeval=f"struct timeval_{abi}", rusage=f"struct rusage_{abi}")
    longs = "".join(f" {types['long']} {name};" for name in _RUSAGE_LONGS)
    fields = "\n".join(f"    {types.get(t, t)} {name};" for t, name in _KINFO_PROC_FIELDS)
    return (
        f"struct timeval_{abi} {{ {types['time']} tv_sec; {types['long']} tv_usec; }};\n"
        f"struct rusage_{abi} {{ {types['timeval']} ru_utime; {types['timeval']} ru_stime;"
        f"{longs} }};\n"
        f"struct kinfo_proc_{abi} {{\n{fields}\n}};\n"
    )


KINFO_PROC_TYPES: dict[int, dict[int, str]] = {
    8: {1088: "struct kinfo_proc_lp64"},
    4: {768: "struct kinfo_proc_i386", 816: "struct kinfo_proc_armv7"},
}
"""Record type by the process's pointer size, then by ``ki_structsize``.

A 32-bit process on amd64 gets 768-byte records, on arm64 816-byte ones (kinfo_proc32)."""


def native_kinfo_proc_size() -> int:
    """``sizeof(struct kinfo_proc)`` of libkvm built for this process's ABI.

    A 32-bit process is i386 (768 bytes) on an x86 machine and armv7 or powerpc (816) on
    anything else; a 64-bit one is LP64 (1088).
    """
    if ffi.sizeof("void *") == 8:
        return 1088
    return 768 if platform.machine() in ("i386", "i686", "amd64", "x86_64") else 816


_FUNCTIONS = """
typedef struct __kvm kvm_t;
struct kvm_swap {
    char ksw_devname[32];
    unsigned int ksw_used;
    unsigned int ksw_total;
    int ksw_flags;
    unsigned int ksw_reserved1;
    unsigned int ksw_reserved2;
};
/* kern.clockrate (sys/sys/time.h); the third int was tickadj, now spare. */
struct clockinfo { int hz; int tick; int spare; int stathz; int profhz; };
struct kvm_nlist {
    const char *n_name;
    unsigned char n_type;
    uint64_t n_value;
};
kvm_t *kvm_openfiles(const char *, const char *, const char *, int, char *);
int kvm_close(kvm_t *);
char *kvm_geterr(kvm_t *);
void *kvm_getprocs(kvm_t *, int, int, int *);
char **kvm_getargv(kvm_t *, const void *, int);
int kvm_getloadavg(kvm_t *, double [], int);
int kvm_getswapinfo(kvm_t *, struct kvm_swap *, int, int);
int kvm_nlist2(kvm_t *, struct kvm_nlist *);
ssize_t kvm_read2(kvm_t *, uint64_t, void *, size_t);
char *devname_r(uint64_t, uint16_t, char *, int);
int sysctlbyname(const char *, void *, size_t *, const void *, size_t);
int sysctlnametomib(const char *, int *, size_t *);
int sysctl(const int *, unsigned int, void *, size_t *, const void *, size_t);
char *jail_getname(int);
void free(void *);
"""
# kvm_getprocs is declared void *: the record type is only known after reading ki_structsize;
# kvm_getargv takes a const void * for the same reason (it reads only ki_pid).

ffi = cffi.FFI()
ffi.cdef(_FUNCTIONS)
ffi.cdef(_abi_cdef("lp64"))
ffi.cdef(_abi_cdef("armv7"))
# i386 aligns 64-bit members (ki_runtime, ki_tdev, time values) to 4 bytes inside structs.
ffi.cdef(_abi_cdef("i386"), pack=4)


def load_jail(path: str) -> Any:
    """``dlopen`` libjail (``jail_getname``) at ``path``; None if it cannot be loaded."""
    try:
        return ffi.dlopen(path)
    except OSError:
        return None


def load(path: str) -> Any:
    """``dlopen`` the library at ``path`` (a file name is searched like ``dlopen(3)`` does).

    ``devname_r`` and ``sysctlbyname`` live in libc on FreeBSD; ``dlsym`` on the libkvm
    handle finds them through its dependencies.
    """
    try:
        return ffi.dlopen(path)
    except OSError as err:
        reason = str(err).removeprefix(f"cannot load library '{path}': ")
        # cffi appends a ctypes.util.find_library() remark that is not dlerror's text.
        reason = reason.split(".  Additionally,")[0]
        raise SourceError(f"cannot load libkvm from '{path}': {reason}") from None
