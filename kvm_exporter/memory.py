"""Memory a burst freed, given back to the system (issue 23).

glibc's malloc keeps what a burst freed in its heaps, spread between blocks still in use: the
OpenSSL buffers of a thousand stalled TLS handshakes, a poll's thousands of group names. The
resident size then stays at the burst's peak (measured: 30 MiB before 1,000 stalled
handshakes, 74 MiB after them, for good). ``malloc_trim(0)`` hands the free pages back
(31 MiB after the same burst); it costs about half a millisecond, so it runs at most once a
second: after a poll, and when the web server has closed many connections. Where the C
library has no ``malloc_trim`` or ``mallopt`` (FreeBSD's jemalloc purges by itself, musl)
nothing is done.

Python's own allocator for small objects (pymalloc) keeps a burst for good: it takes 1 MiB
arenas from the system and returns one only when every block in it is free, which never
happens once a burst's arenas hold a few objects that stay and the later scrapes' objects
(it fills partly used pools first, wherever they lie). 3,000 processes naming a group each
left 7.5-8 MiB behind that way, of which 0.3 MiB was objects still alive. So the service
runs with ``PYTHONMALLOC=malloc`` (:func:`use_c_allocator`): its objects are the C library's
blocks, and ``malloc_trim`` gives back every free page between them. For glibc that also
means one heap for all threads (``M_ARENA_MAX``) and no per-thread cache of freed blocks
(``tcache_count=0``, which only a tunable at start sets): blocks held in a thread's cache
are not free to ``malloc_trim``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import cast

log = logging.getLogger("kvm_exporter")

MIN_GAP = 1.0
"""Seconds between two trims at least."""


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
"""glibc's ``mallopt`` parameters (``malloc.h``)."""
LARGE = 128 * 1024
"""Blocks from this size on get pages of their own, given back when freed: glibc's default,
held there (see :func:`configure`)."""


def _libc(symbol: str) -> Callable[[int], int] | Callable[[int, int], int] | None:
    try:
        function: Callable[[int], int] | Callable[[int, int], int] = getattr(
            ctypes.CDLL(None), symbol
        )
    except (OSError, AttributeError):
        return None
    return function


_TRIM = cast(Callable[[int], int] | None, _libc("malloc_trim"))
_MALLOPT = cast(Callable[[int, int], int] | None, _libc("mallopt"))


def configure() -> None:
    """Keep glibc's thresholds where they start, and one heap for all threads; before any
    thread starts. Left alone, glibc raises its mmap threshold to the largest block freed so
    far (a 330 KiB exposition), then serves such blocks from the heap of whichever thread
    asks, and each of the web workers' heaps keeps its free top up to twice that, which
    ``malloc_trim`` does not give back (it trims the main heap's top only): 8 MiB more after
    a few dozen scrapes of 3,000 groups. The threads take turns at the interpreter anyway,
    so one heap costs them no waiting that matters."""
    if _MALLOPT is not None:
        _MALLOPT(M_MMAP_THRESHOLD, LARGE)
        _MALLOPT(M_TRIM_THRESHOLD, LARGE)
        _MALLOPT(M_ARENA_MAX, 1)


ALLOCATOR = "malloc"
"""``PYTHONMALLOC`` of the service."""
GLIBC_NO_CACHE = "glibc.malloc.tcache_count=0"
"""The glibc tunable that turns the per-thread cache of freed blocks off."""


def service_environment(environ: Mapping[str, str], glibc: bool) -> dict[str, str] | None:
    """``environ`` with :data:`ALLOCATOR`, and glibc's cache off after any tunables given;
    None when ``PYTHONMALLOC`` is set already: by :func:`use_c_allocator`, or by an
    administrator who chose (``PYTHONMALLOC=pymalloc`` keeps Python's allocator)."""
    if "PYTHONMALLOC" in environ:
        return None
    env = dict(environ, PYTHONMALLOC=ALLOCATOR)
    if glibc:
        tunables = env.get("GLIBC_TUNABLES")
        env["GLIBC_TUNABLES"] = f"{tunables}:{GLIBC_NO_CACHE}" if tunables else GLIBC_NO_CACHE
    return env


def use_c_allocator() -> None:
    """Run this process again, same pid and command line, in its
    :func:`service_environment`; returns only when it does not run again. Call it before
    any thread starts."""
    env = service_environment(os.environ, platform.libc_ver()[0] == "glibc")
    if env is None:
        return
    command = [sys.executable, *sys.orig_argv[1:]]
    try:
        os.execve(sys.executable, command, env)
    except OSError as err:
        log.warning(
            "could not start again with PYTHONMALLOC=%s (%s): Python's allocator keeps what "
            "bursts of processes take",
            ALLOCATOR,
            err,
        )


_lock = threading.Lock()
_last = -MIN_GAP


def give_back() -> bool:
    """Return the C heap's free pages to the system, unless done less than :data:`MIN_GAP`
    seconds ago or not possible here; whether it ran."""
    global _last
    if _TRIM is None:
        return False
    with _lock:
        now = time.monotonic()
        if now - _last < MIN_GAP:
            return False
        _last = now
    _TRIM(0)
    return True
