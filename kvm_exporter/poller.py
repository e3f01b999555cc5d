"""The poller: owns the source, polls it, publishes immutable snapshots.

The HTTP side only ever reads :meth:`Poller.snapshot`; it never touches the source. When
``interval`` is 0, a scrape asks the poller's thread for a poll and waits for it: polls run
on that one thread whatever the mode (glibc gives each thread that allocates its own heap,
and a poll's megabytes in every web worker's would stay there).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeVar

from .aggregate import Counts, aggregate, user_names
from .config import PROCESS_EXPORTER, TopConfig, format_duration
from .groups.rules import Rule
from .groups.tracker import GroupCounts, Grouper
from .logs import crash
from .memory import give_back
from .quick import refuse_to_block
from .records import (
    HostLimits,
    HostUsage,
    LoadAvg,
    Source,
    SourceError,
    Survey,
    SwapDevice,
)
from .states import PROCESS_EXPORTER_STATES
from .top import TopProcesses
from .usage import Accounting, Resources, accounting_for

log = logging.getLogger(__name__)

NAMES_TTL = 300.0
"""Seconds a uid's user name is reused before the password database is asked again."""

FIRST_POLL_WAIT = 5.0
"""Until this many seconds after the poller is made, a scrape waits for its first poll."""

COLLECTORS = ("procs", "host", "loadavg", "swap", "limits")
"""The parts of a poll, each timed and reported on its own."""

T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    """What a poll needs from the config; replaced as a whole on reload."""

    interval: float = 15.0
    labels: tuple[str, ...] = ("user", "tty", "state")
    max_series: int = 1000
    compat: tuple[str, ...] = ()
    """Names served besides kvm_*; read by the collectors, not by a poll."""
    groups: tuple[Rule, ...] = ()
    """Named process groups (``groups/tracker.py``); none: no groups."""
    children: bool = True
    details: tuple[str, ...] = ()
    """What more to read of each named process (``details.py``)."""
    resources: tuple[str, ...] | None = ("user",)
    """Labels of the resource metrics; None: not collected."""
    top: TopConfig | None = None
    """The top processes; None: off."""
    top_labels: tuple[str, ...] = ("user",)
    """The labels of the top processes' accounts (the resources' labels, used without them too)."""


@dataclass(frozen=True)
class Snapshot:
    """One finished poll. A part that failed is ``None``: no stale data is served as fresh."""

    counts: Counts | None
    load: LoadAvg | None
    swap: tuple[SwapDevice, ...] | None
    limits: HostLimits | None
    success: Mapping[str, bool]
    duration: Mapping[str, float]
    polled_at: float
    last_success: float | None
    """Wall-clock time of the last poll in which every part succeeded."""
    polls: int
    errors: Mapping[str, int] = field(default_factory=dict)
    overruns: int = 0
    """Polls that took longer than the interval (each logged)."""
    groups: GroupCounts | None = None
    resources: Resources | None = None
    host: HostUsage | None = None
    """The host's own counters, read right after the processes."""
    top: TopProcesses | None = None
    """The top processes (``top`` on), from this poll's survey and the tracker's rows."""

    @property
    def up(self) -> bool:
        return bool(self.success) and all(self.success.values())

    def expired(self) -> Snapshot:
        """This snapshot once too old to pass for current: every part failed, no data."""
        failed = MappingProxyType(dict.fromkeys(self.success, False))
        return dataclasses.replace(
            self,
            counts=None,
            load=None,
            swap=None,
            limits=None,
            success=failed,
            groups=None,
            resources=None,
            host=None,
            top=None,
        )


EMPTY = Snapshot(None, None, None, None, {}, {}, 0.0, None, 0, {})


class Poller:
    """Polls ``source`` every ``settings.interval`` seconds on a thread of its own."""

    def __init__(self, source: Source, settings: Settings) -> None:
        self.source = source
        self.settings = settings
        self._snapshot = EMPTY
        self._poll_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._polled = threading.Event()
        self._first_poll_due = time.monotonic() + FIRST_POLL_WAIT
        """Monotonic time until which a snapshot waits for the first poll to finish. Set here,
        not in :meth:`start`: the server listens before the poller starts, and a scrape in
        between must wait too."""
        self._thread: threading.Thread | None = None
        self._asks = threading.Condition()
        self._asked = self._answered = 0
        """Polls scrapes asked for (``interval`` 0), and of them those a poll has answered."""
        self._names, self._names_since = user_names(), time.monotonic()
        self._grouper: Grouper | None = None
        self._grouper_made: tuple[object, ...] = ()
        self._accounting: Accounting | None = None

    def snapshot(self) -> Snapshot:
        """The latest snapshot; with ``interval`` 0, a fresh poll.

        A poll that hangs (a stuck read) must not leave the last data looking fresh: past
        two intervals and a second without a finished poll, the snapshot is served expired.
        Just after :meth:`start`, it waits for the first poll (:data:`FIRST_POLL_WAIT`), so
        that poll comes first in either mode.
        """
        interval = self.settings.interval
        if not self._polled.is_set() or interval == 0:
            refuse_to_block()
        if not self._polled.is_set():
            self._polled.wait(self._first_poll_due - time.monotonic())
        if interval == 0:
            return self._asked_poll()
        snap = self._snapshot
        if time.time() - snap.polled_at > 2 * interval + 1.0:
            return snap.expired()
        return snap

    def _asked_poll(self) -> Snapshot:
        """A poll begun after this call, run by the poller's thread (here if not started)."""
        if self._thread is None:
            return self.poll()
        with self._asks:
            self._asked += 1
            ask = self._asked
            self._wake.set()
            self._asks.wait_for(lambda: self._answered >= ask or self._stop.is_set())
            return self._snapshot

    def scraped(self) -> Snapshot:
        """The snapshot this scrape's first collector got: with ``interval`` 0 the one it
        polled (no second poll per scrape), else :meth:`snapshot`."""
        return self._snapshot if self.settings.interval == 0 else self.snapshot()

    def poll(self) -> Snapshot:
        """Poll every part once, publish and return the snapshot."""
        with self._poll_lock:
            began = time.monotonic()
            with self._asks:
                asked = self._asked  # what this poll answers
            settings, previous = self.settings, self._snapshot
            success: dict[str, bool] = {}
            duration: dict[str, float] = {}
            errors = dict(previous.errors)

            def timed(part: str, read: Callable[[], T]) -> T | None:
                start = time.perf_counter()
                try:
                    value: T | None = read()
                except SourceError as err:
                    log.error("poll of %s failed: %s", part, err)
                    errors[part] = errors.get(part, 0) + 1
                    value = None
                except Exception as err:  # a bug or unforeseen content: fail the part, not
                    # the poller thread, which would leave the last snapshot served as fresh
                    log.error("poll of %s failed: %s: %s", part, type(err).__name__, err)
                    errors[part] = errors.get(part, 0) + 1
                    value = None
                duration[part] = time.perf_counter() - start
                success[part] = value is not None
                return value

            if time.monotonic() - self._names_since > NAMES_TTL:
                self._names, self._names_since = user_names(), time.monotonic()
            source, names = self.source, self._names
            grouper = self._grouper_for(source, settings)
            procs = timed("procs", lambda: self._procs(source, settings, names, grouper))
            counts, resources, survey = procs or (None, None, None)
            host = timed("host", source.host_usage)  # beside the processes' read
            groups = None
            if grouper is not None:
                if survey is None:
                    success["groups"] = False  # the process list failed: logged as procs
                else:
                    groups = timed("groups", lambda: grouper.update(survey))
            top = None
            accounting, top_config = self._accounting, settings.top
            if accounting is not None and top_config is not None and survey is not None:
                group_of = None if grouper is None else grouper.name_of
                top = timed("top", lambda: accounting.top_processes(group_of))
            load = timed("loadavg", source.loadavg)
            swap = timed("swap", lambda: tuple(source.swap()))
            limits = timed("limits", source.limits)
            now = time.time()
            up = all(success.values())  # never empty: every part ran
            overruns = previous.overruns + self._overran(time.monotonic() - began, settings)
            self._snapshot = Snapshot(
                counts=counts,
                load=load,
                swap=swap,
                limits=limits,
                success=MappingProxyType(success),
                duration=MappingProxyType(duration),
                polled_at=now,
                last_success=now if up else previous.last_success,
                polls=previous.polls + 1,
                errors=MappingProxyType(errors),
                overruns=overruns,
                groups=groups,
                resources=resources,
                host=host,
                top=top,
            )
            self._polled.set()
            self._answer(asked)
            give_back()  # what this poll freed (the processes gone, their names)
            return self._snapshot

    @staticmethod
    def _overran(took: float, settings: Settings) -> bool:
        """Whether a poll that ``took`` seconds overran its interval, logged if so: scrapes
        meanwhile got the previous snapshot, and the poll loop skips the ticks it overran."""
        if not 0 < settings.interval < took:
            return False
        log.warning(
            "poll took %.1fs, longer than the %s interval: its data is served late",
            took,
            format_duration(settings.interval),
        )
        return True

    def _answer(self, asked: int) -> None:
        with self._asks:
            self._answered = max(self._answered, asked)
            self._asks.notify_all()

    def _grouper_for(self, source: Source, settings: Settings) -> Grouper | None:
        """The grouper of these settings: kept across polls (it remembers each process's
        group and keeps the groups' counters), made afresh when the rules, the cap or the
        source change."""
        if not settings.groups:
            self._grouper = None
            return None
        made = (
            source,
            settings.groups,
            settings.children,
            settings.max_series,
            settings.compat,
            settings.details,
        )
        if self._grouper is None or self._grouper_made != made:
            # process-exporter's names show every group in each state it knows.
            pe = len(PROCESS_EXPORTER_STATES) if PROCESS_EXPORTER in settings.compat else 1
            read = getattr(source, "details", None)  # procfs only (service.py refuses others)
            self._grouper = Grouper(
                settings.groups,
                settings.children,
                settings.max_series,
                source.argv,
                lambda uid: self._names(uid),
                source.usage_spec,
                pe,
                getattr(source, "cgroups", None),  # Linux only
                getattr(source, "thread_states", None) if pe > 1 else None,
                (read, settings.details) if read is not None and settings.details else None,
            )
            self._grouper_made = made
        return self._grouper

    def _procs(
        self,
        source: Source,
        settings: Settings,
        names: Callable[[int], str],
        grouper: Grouper | None,
    ) -> tuple[Counts, Resources | None, Survey | None]:
        """Counts, and resources where asked for, from one read; with them or with groups,
        the survey (every process's usage record) the groups are counted from."""
        labels = settings.resources
        if labels is None and settings.top is not None:
            labels = settings.top_labels  # resources counted for the top sets, not served
        accounting = self._accounting = accounting_for(
            self._accounting, source, labels, settings.max_series, settings.top
        )
        survey = source.survey() if accounting is not None or grouper is not None else None
        resources = None
        if accounting is not None and survey is not None:
            resources = accounting.poll(survey, names)
            if settings.resources is None:
                resources = None
        counts = aggregate(
            survey.census if survey is not None else source.census(),
            settings.labels,
            settings.max_series,
            names,
            source.states,
            source.jail_name,
        )
        return counts, resources, survey

    def start(self) -> None:
        """Poll now, then every interval, on a background thread."""
        self._thread = threading.Thread(target=self._run, name="poller", daemon=True)
        self._thread.start()

    def reconfigure(self, source: Source, settings: Settings) -> Source:
        """Swap in a new source and settings; returns the old source for the caller to close."""
        with self._poll_lock:
            old, self.source, self.settings = self.source, source, settings
        self._wake.set()
        return old

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            crash("the poller thread")

    def _loop(self) -> None:
        self.poll()
        next_due = time.monotonic() + self.settings.interval
        while True:
            interval = self.settings.interval
            # Collect-on-scrape mode (0) polls when a scrape asks: sleep until then.
            timeout = max(next_due - time.monotonic(), 0.0) if interval > 0 else None
            self._wake.wait(timeout)
            self._wake.clear()
            if self._stop.is_set():
                return
            interval = self.settings.interval
            if interval == 0:
                if self._asked > self._answered:
                    self.poll()
                continue
            started = time.monotonic()
            self.poll()
            # A poll slower than the interval skips the ticks it overran: no pile-up.
            overran = (time.monotonic() - started) // interval
            next_due = started + interval * (overran + 1)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._answer(self._asked)  # a scrape waiting for a poll gets the last one
        if self._thread is not None:
            self._thread.join(timeout=0.5)  # a hung poll must not hold up the exit
