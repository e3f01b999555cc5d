"""Usage records as :class:`~kvm_exporter.records.Records`, digested in C (``_procscan``'s
``kvm_digest``): the tracker then compares a poll with the last by 64-bit digests, and makes
bytes of only the records that changed. The key is drawn once per process, so no process
can choose a record whose digest equals another's."""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from operator import itemgetter
from typing import Any

from ..records import Records

try:
    from ._procscan import ffi as _ffi  # type: ignore[import-not-found, unused-ignore]
    from ._procscan import lib as _lib  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # built only where pip found a C compiler and Python's headers
    _ffi = _lib = None

_KEY = int.from_bytes(os.urandom(8), "little")


def records(buffer: Any, count: int, stride: int, size: int) -> Sequence[bytes]:
    """The ``count`` records of ``size`` bytes, ``stride`` apart, in ``buffer`` (kept, not
    copied: the caller makes it for this poll); a list of bytes without ``_procscan``."""
    if _lib is None:
        layout = struct.Struct(f"{size}s{stride - size}x")
        return list(map(itemgetter(0), layout.iter_unpack(memoryview(buffer)[: count * stride])))
    digests = _ffi.new("uint64_t[]", count)
    _lib.kvm_digest(_ffi.from_buffer(buffer), count, stride, size, _KEY, digests)
    return Records(buffer, stride, size, _ffi.unpack(digests, count))
