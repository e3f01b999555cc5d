"""Process counts per label group: a census in, counts out, no Prometheus here."""

from __future__ import annotations

import functools
import pwd
from collections.abc import Callable
from operator import itemgetter
from typing import Any, Final, NamedTuple

from .records import Census, Kind
from .states import STATES

OTHER = "other"
"""Label value of folded groups and of the zero-filled states."""

MIN_SERIES = len(STATES) + 1
"""The smallest cap that leaves room for every state plus one group of its own."""

Key = tuple[str, ...]

_FIELD = {"user": 0, "tty": 1, "state": 2, "jail": 4}
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
    states: tuple[str, ...] = STATES,
    jail_name: Callable[[int], str] = str,
) -> Counts:
    """Count processes and threads per ``labels`` group of a census.

    Every state of ``states`` (what the source can tell apart) gets a series, zero if no
    process is in it. Past
    ``max_series`` series, detail goes in this order, so one user cannot hide the others:
    first the tty of the users with the most groups (their groups merge into ``tty="other"``),
    then, if even that is too many, whole users, smallest first, into ``user="other"`` (one
    group per state). The state is never folded: the state totals stay exact. Counts always
    add up to the census, and the result never has more than ``max_series`` groups when
    ``max_series >= MIN_SERIES``.
    """
    name = user_name or user_names()
    # A host has thousands of processes but few kinds (most processes have one thread), so
    # this loop runs once per kind; uids and jails become names once per group of raw values.
    fields = [_FIELD[label] for label in labels]
    pick: Callable[[Kind], tuple[Any, ...]] = (
        itemgetter(*fields) if len(fields) > 1 else lambda kind: tuple(kind[f] for f in fields)
    )
    processes: dict[Any, int] = {}
    threads: dict[Any, int] = {}
    for kind, count in census.items():
        raw = pick(kind)
        processes[raw] = processes.get(raw, 0) + count
        each = kind[_THREADS]
        threads[raw] = threads.get(raw, 0) + (count * each if each > 1 else count)  # one at least
    named = [i for i, label in enumerate(labels) if label == "user"]
    jails = [i for i, label in enumerate(labels) if label == "jail"]
    if named or jails:
        jail_name = functools.cache(jail_name)  # once per jail, not per group

        def by_name(raw: tuple[Any, ...]) -> Key:
            values = list(raw)
            for i in named:
                values[i] = name(values[i])
            for i in jails:
                values[i] = jail_name(values[i])
            return tuple(values)

        # Two uids can share a name: their groups add up.
        processes, threads, _ = _refold(processes, threads, by_name)

    at = _Positions.of(labels)
    missing = set(states) - {key[at.state] for key in processes} if at.state is not None else ()
    folded = 0
    if len(processes) + len(missing) > max_series:
        fold = _folding(processes, at, max_series - len(missing), max_series)
        processes, threads, folded = _refold(processes, threads, fold)
    for state in states:
        if state in missing:
            key = _other_key(len(labels), at.state, state)
            processes[key] = threads[key] = 0
    return Counts(labels, processes, threads, folded)


class _Positions(NamedTuple):
    """Where the user, tty and state values sit in a key (None: not a label)."""

    user: int | None
    tty: int | None
    state: int | None

    @classmethod
    def of(cls, labels: tuple[str, ...]) -> _Positions:
        where = {label: i for i, label in enumerate(labels)}
        return cls(where.get("user"), where.get("tty"), where.get("state"))


def _folding(
    counts: dict[Key, int], at: _Positions, budget: int, max_series: int
) -> Callable[[Key], Key]:
    """The key each group of ``counts`` folds into so that at most ``budget`` groups stay
    (``max_series`` once whole users fold, as their ``other`` rows take the zero rows' place)."""
    tty_folded, groups = _fold_ttys(counts, at, budget)

    def tty_fold(key: Key) -> Key:
        return _without(key, at.tty) if at.user is not None and key[at.user] in tty_folded else key

    owner: Callable[[Key], Any] = (lambda key: key) if at.user is None else itemgetter(at.user)
    kept: set[Any] | None = None  # owners that keep their own groups; None: all of them
    if groups > budget:
        room = max_series - len(STATES) if at.state is not None else max_series - 1
        kept = _biggest_owners(counts, owner, tty_fold, room)

    def fold(key: Key) -> Key:
        if kept is not None and owner(key) not in kept:
            return _other_key(len(key), at.state, key[at.state] if at.state is not None else "")
        return tty_fold(key)

    return fold


def _fold_ttys(counts: dict[Key, int], at: _Positions, budget: int) -> tuple[set[str], int]:
    """Users whose tty to fold, those with the most groups first, until at most ``budget``
    groups stay (or no user's fold helps); and how many groups stay."""
    if at.user is None or at.tty is None:
        return set(), len(counts)
    keys_of: dict[str, list[Key]] = {}
    for key in counts:
        keys_of.setdefault(key[at.user], []).append(key)
    folded: set[str] = set()
    groups = len(counts)
    for user in sorted(keys_of, key=lambda u: (-len(keys_of[u]), u)):
        if groups <= budget:
            break
        # Users are disjoint, so a user's fold only merges that user's own groups.
        coarse = len({_without(key, at.tty) for key in keys_of[user]})
        if coarse < len(keys_of[user]):
            folded.add(user)
            groups -= len(keys_of[user]) - coarse
    return folded, groups


def _biggest_owners(
    counts: dict[Key, int],
    owner: Callable[[Key], Any],
    tty_fold: Callable[[Key], Key],
    room: int,
) -> set[Any]:
    """The owners (users; groups without a user label) with the most processes whose groups,
    whole, fit in ``room``."""
    totals: dict[Any, int] = {}
    groups: dict[Any, set[Key]] = {}
    for key, count in counts.items():
        who = owner(key)
        totals[who] = totals.get(who, 0) + count
        groups.setdefault(who, set()).add(tty_fold(key))
    kept: set[Any] = set()
    for who in sorted(totals, key=lambda w: (-totals[w], w)):
        room -= len(groups[who])
        if room < 0:
            break
        kept.add(who)
    return kept


def _without(key: Key, at: int | None) -> Key:
    """``key`` with the value at ``at`` folded into ``other``."""
    if at is None:
        return key
    return (*key[:at], OTHER, *key[at + 1 :])


def _other_key(width: int, state_at: int | None, state: str) -> Key:
    key = [OTHER] * width
    if state_at is not None:
        key[state_at] = state
    return tuple(key)


def _refold(
    processes: dict[Any, int], threads: dict[Any, int], into: Callable[[Any], Key]
) -> tuple[dict[Key, int], dict[Key, int], int]:
    """``processes`` and ``threads`` with each key replaced by ``into`` of it, added up where
    two keys become one (in the order first seen), and how many keys ``into`` changed."""
    out_processes: dict[Key, int] = {}
    out_threads: dict[Key, int] = {}
    changed = 0
    for key, count in processes.items():
        new = into(key)
        changed += new != key
        out_processes[new] = out_processes.get(new, 0) + count
        out_threads[new] = out_threads.get(new, 0) + threads[key]
    return out_processes, out_threads, changed
