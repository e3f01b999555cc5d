"""Memory a burst freed, given back to the system (issue 23).

glibc's malloc keeps what a burst freed in its heaps, spread between blocks still in use: the
OpenSSL buffers of a thousand stalled TLS handshakes, a poll's thousands of group names. The
resident size then stays at the burst's peak (measured: 30 MiB before 1,000 stalled
handshakes, 74 MiB after them, for good). ``malloc_trim(0)`` hands the free pages back
(31 MiB after the same burst); it costs about half a millisecond, so it runs at most once a
second: after a poll, and when the web server has closed many connections. Where the C
library has no ``malloc_trim`` or ``mallopt`` (FreeBSD's jemalloc purges by itself, musl)
nothing is done.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from typing import cast

MIN_GAP = 1.0
"""Seconds between two trims at least."""


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
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
    """Keep glibc's thresholds where they start. Left alone, glibc raises its mmap threshold
    to the largest block freed so far (a 330 KiB exposition), then serves such blocks from
    the heap of whichever thread asks, and each of the web workers' heaps keeps its free top
    up to twice that, which ``malloc_trim`` does not give back (it trims the main heap's top
    only): 8 MiB more after a few dozen scrapes of 3,000 groups."""
    if _MALLOPT is not None:
        _MALLOPT(M_MMAP_THRESHOLD, LARGE)
        _MALLOPT(M_TRIM_THRESHOLD, LARGE)


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
