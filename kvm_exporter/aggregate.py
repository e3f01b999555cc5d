"""Process counts per label group: records in, counts out, no Prometheus here."""

from __future__ import annotations

import heapq
import pwd
from collections.abc import Callable, Iterable
from typing import NamedTuple

from .records import Proc
from .states import STATES

OTHER = "other"
"""Label value of folded groups and of the zero-filled states."""

MIN_SERIES = len(STATES) + 1
"""The smallest cap that leaves room for every state plus one group of its own."""

Key = tuple[str, ...]


class Counts(NamedTuple):
    labels: tuple[str, ...]
    """Label names, in the order of every key's values."""
    processes: dict[Key, int]
    threads: dict[Key, int]
    folded: int
    """Groups folded into ``other`` to stay under the series cap."""


def user_names() -> Callable[[int], str]:
    """A uid-to-name lookup for one poll: names from the password database, else the uid."""
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
    key_of: Callable[[Proc], Key]
    if labels == ("user", "tty", "state"):
        key_of = lambda p: (name(p.uid), p.tty, p.state)  # noqa: E731 - the common case, inlined
    else:
        getters: dict[str, Callable[[Proc], str]] = {
            "user": lambda p: name(p.uid),
            "tty": lambda p: p.tty,
            "state": lambda p: p.state,
        }
        parts = [getters[label] for label in labels]
        key_of = lambda p: tuple(get(p) for get in parts)  # noqa: E731
    processes: dict[Key, int] = {}
    threads: dict[Key, int] = {}
    for p in procs:
        key = key_of(p)
        processes[key] = processes.get(key, 0) + 1
        threads[key] = threads.get(key, 0) + p.threads

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
    for key, count in counts.items():
        if key not in keep:
            key = _other_key(len(key), state_at, key[state_at] if state_at is not None else "")
        out[key] = out.get(key, 0) + count
    return out
