"""Usage records as :class:`~kvm_exporter.records.Records`, digested in C (``_procscan``'s
``kvm_digest``) and set against the last poll's digests in C (``kvm_index``): the tracker
makes bytes of only the records that changed, and no Python object per process. The key is
drawn once per process, so no process can choose a record whose digest equals another's."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator, Sequence
from operator import itemgetter
from typing import Any

from ..records import Digests, Records, changes_by_sets

try:
    from ._procscan import ffi as _ffi  # type: ignore[import-not-found, unused-ignore]
    from ._procscan import lib as _lib  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # built only where pip found a C compiler and Python's headers
    _ffi = _lib = None

_KEY = int.from_bytes(os.urandom(8), "little")


class CompiledDigests:
    """:class:`~kvm_exporter.records.Digests` in C memory: the digests in record order and
    a hash set of them, compared with another such set in C."""

    def __init__(self, order: Any, count: int, index: Any) -> None:
        self._order, self._count, self._index = order, count, index

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[int]:
        return iter(_ffi.unpack(self._order, self._count))

    def digest(self, at: int) -> int:
        return int(self._order[at])

    def members(self) -> set[int]:
        return set(self)

    def changes(self, last: Digests | None) -> tuple[list[int], list[int]]:
        if last is not None and not isinstance(last, CompiledDigests):
            return changes_by_sets(self, last)
        fresh = _ffi.new("int[]", self._count)
        stale = _ffi.new("uint64_t[]", 0 if last is None else last._count)
        nstale = _ffi.new("int *")
        n = _lib.kvm_index_diff(
            _ffi.NULL if last is None else last._index, self._index, fresh, stale, nstale
        )
        return _ffi.unpack(fresh, n), _ffi.unpack(stale, nstale[0])


def compiled(order: Any, count: int) -> CompiledDigests | None:
    """The ``count`` digests at ``order`` (a cffi array, kept) as a set; None where two are
    equal (two records with one digest: that poll is compared by the bytes' hashes) or one is
    0 (``kvm_digest`` never gives 0: it marks a free slot)."""
    index = _lib.kvm_index_new(order, count)
    if index == _ffi.NULL:
        if _ffi.errno == errno.ENOMEM:
            raise MemoryError("kvm_index_new: out of memory")
        return None
    return CompiledDigests(order, count, _ffi.gc(index, _lib.kvm_index_free))


def records(buffer: Any, count: int, stride: int, size: int) -> Sequence[bytes]:
    """The ``count`` records of ``size`` bytes, ``stride`` apart, in ``buffer`` (kept, not
    copied: the caller makes it for this poll); a list of bytes without ``_procscan``."""
    if _lib is None:
        layout = struct.Struct(f"{size}s{stride - size}x")
        return list(map(itemgetter(0), layout.iter_unpack(memoryview(buffer)[: count * stride])))
    order = _ffi.new("uint64_t[]", count)
    _lib.kvm_digest(_ffi.from_buffer(buffer), count, stride, size, _KEY, order)
    return Records(buffer, stride, size, count, compiled(order, count))
