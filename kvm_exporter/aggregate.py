"""Process counts per label group: a census in, counts out, no Prometheus here."""

from __future__ import annotations

import heapq
import pwd
from collections.abc import Callable
from typing import Any, Final, NamedTuple

from .records import Census
from .states import STATES

OTHER = "other"
"""Label value of folded groups and of the zero-filled states."""

MIN_SERIES = len(STATES) + 1
"""The smallest cap that leaves room for every state plus one group of its own."""

Key = tuple[str, ...]

_FIELD = {"user": 0, "tty": 1, "state": 2}
"""Where each label's raw value sits in a :data:`~kvm_exporter.records.Kind`."""
_THREADS: Final = 3


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
    census: Census,
    labels: tuple[str, ...],
    max_series: int,
    user_name: Callable[[int], str] | None = None,
) -> Counts:
    """Count processes and threads per ``labels`` group of a census.

    Every state of the vocabulary gets a series (zero if no process is in it), and past
    ``max_series`` series the smallest groups fold into ``other``, one per state; the result
    never has more than ``max_series`` groups when ``max_series >= MIN_SERIES``.
    """
    name = user_name or user_names()
    # A host has thousands of processes but few kinds (most processes have one thread), so
    # this loop runs once per kind, and uids become names once per kind.
    fields = [_FIELD[label] for label in labels]
    named = [i for i, label in enumerate(labels) if label == "user"]
    processes: dict[Key, int] = {}
    threads: dict[Key, int] = {}
    for kind, count in census.items():
        values: list[Any] = [kind[f] for f in fields]
        for i in named:
            values[i] = name(values[i])
        key = tuple(values)
        # Two uids can share a name: their groups add up.
        processes[key] = processes.get(key, 0) + count
        threads[key] = threads.get(key, 0) + count * max(kind[_THREADS], 1)  # one at least

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
