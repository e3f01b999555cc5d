"""Memory a burst freed, given back to the system (issue 23).

glibc's malloc keeps what a burst freed in its heaps, spread between blocks still in use: the
OpenSSL buffers of a thousand stalled TLS handshakes, a poll's thousands of group names. The
resident size then stays at the burst's peak (measured: 30 MiB before 1,000 stalled
handshakes, 74 MiB after them, for good). ``malloc_trim(0)`` hands the free pages back
(31 MiB after the same burst); it costs about half a millisecond, so it runs at most once a
second: after a poll, and when the web server has closed many connections. Where the C
library has no ``malloc_trim`` (FreeBSD's jemalloc purges by itself, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable

MIN_GAP = 1.0
"""Seconds between two trims at least."""


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_TRIM = _malloc_trim()
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
