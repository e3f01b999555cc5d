"""Process counts per label group: records in, counts out, no Prometheus here."""

from __future__ import annotations

import heapq
import pwd
from collections import Counter
from collections.abc import Callable, Iterable
from operator import itemgetter
from typing import Any, NamedTuple

from .records import Proc
from .states import STATES

OTHER = "other"
"""Label value of folded groups and of the zero-filled states."""

MIN_SERIES = len(STATES) + 1
"""The smallest cap that leaves room for every state plus one group of its own."""

Key = tuple[str, ...]

_FIELD = {
    "user": Proc._fields.index("uid"),
    "tty": Proc._fields.index("tty"),
    "state": Proc._fields.index("state"),
}
_THREADS = Proc._fields.index("threads")


class Counts(NamedTuple):
    labels: tuple[str, ...]
    """Label names, in the order of every key's values."""
    processes: dict[Key, int]
    threads: dict[Key, int]
    folded: int
    """Groups folded into ``other`` to stay under the series cap."""


def user_names() -> Callable[[int], str]:
    """A caching uid-to-name lookup: names from the password database, else the uid."""
    cache: dict[int, str] = {}

    def name(uid: int) -> str:
        found = cache.get(uid)
        if found is None:
            try:
                found = pwd.getpwuid(uid).pw_name
            except KeyError:
                found = str(uid)
            cache[uid] = found
        return found

    return name


def aggregate(
    procs: Iterable[Proc],
    labels: tuple[str, ...],
    max_series: int,
    user_name: Callable[[int], str] | None = None,
) -> Counts:
    """Count processes and threads per ``labels`` group.

    Every state of the vocabulary gets a series (zero if no process is in it), and past
    ``max_series`` series the smallest groups fold into ``other``, one per state; the result
    never has more than ``max_series`` groups when ``max_series >= MIN_SERIES``.
    """
    name = user_name or user_names()
    # One C-level pass (itemgetter, Counter) counts processes per (threads, *raw label values),
    # uids not yet names; Python then loops once per distinct tuple: a host has thousands of
    # processes but few (threads, uid, tty, state), as most processes have one thread.
    fields = [_FIELD[label] for label in labels]
    # Without labels, itemgetter(_THREADS) would give a bare int: a stand-in gives the tuple.
    count_key: Callable[[Proc], tuple[Any, ...]] = (
        itemgetter(_THREADS, *fields) if fields else lambda p: (p[_THREADS],)
    )
    named = [i for i, label in enumerate(labels) if label == "user"]
    processes: dict[Key, int] = {}
    threads: dict[Key, int] = {}
    for (n, *values), count in Counter(map(count_key, procs)).items():
        for i in named:
            values[i] = name(values[i])
        key = tuple(values)
        # Two uids can share a name: their groups add up.
        processes[key] = processes.get(key, 0) + count
        threads[key] = threads.get(key, 0) + count * max(n, 1)  # a process is one thread at least

    state_at = labels.index("state") if "state" in labels else None
    missing = set(STATES) - {key[state_at] for key in processes} if state_at is not None else ()
    folded = 0
    if len(processes) + len(missing) > max_series:
        room = max(max_series - len(STATES), 0) if state_at is not None else max_series - 1
        keep = set(heapq.nlargest(room, processes, key=processes.__getitem__))
        folded = len(processes) - len(keep)
        processes, threads = _fold(processes, keep, state_at), _fold(threads, keep, state_at)
    for state in STATES:
        if state in missing:
            key = _other_key(len(labels), state_at, state)
            processes[key] = threads[key] = 0
    return Counts(labels, processes, threads, folded)


def _other_key(width: int, state_at: int | None, state: str) -> Key:
    key = [OTHER] * width
    if state_at is not None:
        key[state_at] = state
    return tuple(key)


def _fold(counts: dict[Key, int], keep: set[Key], state_at: int | None) -> dict[Key, int]:
    out: dict[Key, int] = {}
    others: dict[str, Key] = {}  # the other key per state, built once each
    for key, count in counts.items():
        if key not in keep:
            state = key[state_at] if state_at is not None else ""
            other = others.get(state)
            if other is None:
                other = others[state] = _other_key(len(key), state_at, state)
            key = other
        out[key] = out.get(key, 0) + count
    return out
