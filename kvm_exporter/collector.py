"""Turn the poller's latest snapshot into Prometheus metric families."""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable, Iterator
from typing import NamedTuple, TypeVar

from prometheus_client import ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .aggregate import Key
from .poller import COLLECTORS, Snapshot
from .records import HostUsage, OwnUsage, Source, SourceError
from .top import TopProcesses
from .usage import Resources
from .visibility import Visibility

AS_OF = ", as of the last poll."
"""Ends the HELP text of every value read from the system (the snapshot may be a poll old)."""

log = logging.getLogger(__name__)


class ReloadStatus(NamedTuple):
    successful: bool
    failures: int
    last_success: float
    """Wall-clock time of the last successful config load (start-up counts)."""


def label_value(value: str) -> str:
    """``value`` as UTF-8 an exposition can carry. Names from the system (passwd, /dev, swap
    files) are bytes; Python decodes those that are not UTF-8 to lone surrogates, which would
    make every scrape fail. They become U+FFFD."""
    if value.isascii():
        return value
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace")


N = TypeVar("N", int, float)


def _utf8_keys(counts: dict[Key, N]) -> dict[Key, N]:
    """``counts`` with every label value made UTF-8; keys that become equal are merged."""
    if all(v.isascii() for key in counts for v in key):
        return counts
    out: dict[Key, N] = {}
    for key, count in counts.items():
        key = tuple(label_value(v) for v in key)
        out[key] = out[key] + count if key in out else count
    return out


def labelled_gauge(name: str, doc: str, labels: tuple[str, ...], counts: dict[Key, N]) -> Metric:
    """A gauge of one series per key (label values in ``labels`` order), sorted, its label
    values made UTF-8; ``doc`` gets "as of the last poll"."""
    family = GaugeMetricFamily(name, doc + AS_OF, labels=labels)
    counts = _utf8_keys(counts)
    for key in sorted(counts):  # a stable order, whatever order the source listed processes
        family.add_metric(key, counts[key])
    return family


def _gauge(name: str, doc: str, value: float) -> Metric:
    return GaugeMetricFamily(name, doc, value=value)


COUNTED = " reaped children's included, since the exporter started."
"""Ends the HELP of the usage counters (README: what the counters include)."""
COUNTERS: dict[str, tuple[str, str, str]] = {
    "cpu": (
        "kvm_cpu_seconds",
        "Seconds of CPU time the group's processes used, by mode," + COUNTED,
        "mode",
    ),
    "page_faults": (
        "kvm_page_faults",
        "Page faults of the group's processes, by type," + COUNTED,
        "type",
    ),
    "context_switches": (
        "kvm_context_switches",
        "Context switches of the group's processes, by type, since the exporter started"
        " (FreeBSD: reaped children's included; Linux: the live threads' of each process).",
        "type",
    ),
    "io_bytes": (
        "kvm_io_bytes",
        "Bytes the group's processes read from and wrote to storage (Linux PID/io), by"
        " direction, since the exporter started.",
        "direction",
    ),
    "block_operations": (
        "kvm_block_operations",
        "Block input and output operations of the group's processes," + COUNTED,
        "direction",
    ),
    "processes_started": (
        "kvm_processes_started",
        "Processes of the group first seen by a poll after the first, since the exporter started.",
        "",
    ),
}
"""Family name, HELP and label of each counter metric of :class:`~kvm_exporter.usage.Resources`
(no label: one series per account or named group)."""


def counter_families(
    counters: dict[tuple[str, str], dict[Key, float]], labels: tuple[str, ...], whose: str = ""
) -> Iterator[Metric]:
    """One counter family per metric of ``counters`` (:data:`COUNTERS`), its series per key
    (label values in ``labels`` order) and value; ``whose``, for the named groups, goes into the
    family names and HELP (``namegroup``: ``kvm_namegroup_cpu_seconds_total``)."""
    families: dict[str, CounterMetricFamily] = {}
    for (metric, value), series in counters.items():
        name, doc, label = COUNTERS[metric]
        family = families.get(metric)
        if family is None:
            if whose:
                name = name.replace("kvm_", f"kvm_{whose}_", 1)
                doc = doc.replace("group's", "named group's")
            family = families[metric] = CounterMetricFamily(
                name, doc, labels=(*labels, label) if label else labels
            )
        for key, total in sorted(_utf8_keys(series).items()):
            family.add_metric((*key, value) if label else key, total)
    yield from families.values()


def _resources(res: Resources) -> Iterator[Metric]:
    """The resource families: gauges per account, counters per account and mode."""
    labels = res.labels
    for name, doc, values in (
        ("kvm_group_processes", "Processes per resource group", res.processes),
        (
            "kvm_resident_memory_bytes",
            "Resident memory of the group's processes in bytes",
            res.resident_bytes,
        ),
        (
            "kvm_virtual_memory_bytes",
            "Virtual memory size of the group's processes in bytes",
            res.virtual_bytes,
        ),
    ):
        yield labelled_gauge(name, doc, labels, values)
    yield from counter_families(res.counters, labels)
    yield _gauge(
        "kvm_resource_folded_groups",
        "Resource groups folded into 'other' to stay under max_series" + AS_OF,
        res.folded,
    )
    jails = GaugeMetricFamily(
        "kvm_jail_info",
        "Always 1: a jail with processes, by id and name" + AS_OF,
        labels=["jid", "jail"],
    )
    for jid, jail in sorted(res.jails.items()):
        jails.add_metric([str(jid), label_value(jail)], 1)
    yield jails


def _host(host: HostUsage) -> Iterator[Metric]:
    """The host's own counters, which the accounts' add up to (or say what they miss)."""
    for name, doc, label, values in (
        (
            "kvm_host_cpu_seconds",
            "Seconds of CPU time the host spent since boot, by mode",
            "mode",
            host.cpu_seconds,
        ),
        (
            "kvm_host_page_faults",
            "Page faults of the host since boot, by type",
            "type",
            host.page_faults,
        ),
    ):
        if values:
            family = CounterMetricFamily(name, doc + AS_OF, labels=[label])
            for value, total in values.items():
                family.add_metric([value], total)
            yield family
    if host.forks is not None:
        yield CounterMetricFamily(
            "kvm_forks", "Processes created on the host since boot" + AS_OF, value=host.forks
        )


def _top(top: TopProcesses) -> Iterator[Metric]:
    """The top processes by CPU and memory (``top``), one series per process and value."""
    labels = top.labels
    cpu = CounterMetricFamily(
        "kvm_top_process_cpu_seconds",
        "Seconds of CPU time a top process used since it started, by mode" + AS_OF,
        labels=(*labels, "mode"),
    )
    rss = GaugeMetricFamily(
        "kvm_top_process_resident_memory_bytes",
        "Resident memory of a top process in bytes" + AS_OF,
        labels=labels,
    )
    start = GaugeMetricFamily(
        "kvm_top_process_start_time_seconds",
        "Start time of a top process in seconds since the epoch" + AS_OF,
        labels=labels,
    )
    for process in top.processes:
        key = [label_value(v) for v in process.labels]
        for mode, seconds in process.cpu_seconds.items():
            cpu.add_metric([*key, mode], seconds)
        rss.add_metric(key, process.resident_bytes)
        if process.start_time is not None:
            start.add_metric(key, process.start_time)
    yield from (cpu, rss, start)


class KvmCollector(Collector):
    """Serves the snapshot ``snapshot()`` returns, plus build and reload information."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        source_name: Callable[[], str],
        reload_status: Callable[[], ReloadStatus],
    ) -> None:
        self._snapshot = snapshot
        self._source_name = source_name
        self._reload_status = reload_status

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield from self._data(snap)
        yield from self._health(snap)
        yield from self._meta()

    def _data(self, snap: Snapshot) -> Iterator[Metric]:
        if snap.counts is not None:
            c = snap.counts
            yield labelled_gauge(
                "kvm_processes", "Processes per label group", c.labels, c.processes
            )
            yield labelled_gauge(
                "kvm_threads", "Threads of the processes per label group", c.labels, c.threads
            )
            yield _gauge(
                "kvm_processes_folded_groups",
                "Label groups folded into 'other' to stay under max_series" + AS_OF,
                c.folded,
            )
        if snap.resources is not None:
            yield from _resources(snap.resources)
        if snap.host is not None:
            yield from _host(snap.host)
        if snap.top is not None:
            yield from _top(snap.top)
        if snap.load is not None:
            for minutes, value in zip((1, 5, 15), snap.load, strict=False):
                yield _gauge(f"kvm_load{minutes}", f"{minutes}-minute load average{AS_OF}", value)
        if snap.swap is not None:
            size = GaugeMetricFamily(
                "kvm_swap_size_bytes", "Size of a swap device in bytes" + AS_OF, labels=["device"]
            )
            used = GaugeMetricFamily(
                "kvm_swap_used_bytes", "Bytes of swap in use on a device" + AS_OF, labels=["device"]
            )
            sizes = _utf8_keys({(dev.device,): dev.size_bytes for dev in snap.swap})
            useds = _utf8_keys({(dev.device,): dev.used_bytes for dev in snap.swap})
            for key, size_bytes in sizes.items():
                size.add_metric(key, size_bytes)
                used.add_metric(key, useds[key])
            yield size
            yield used
        if snap.limits is not None:
            lim = snap.limits
            yield _gauge("kvm_cpus", "CPUs of the host" + AS_OF, lim.cpus)
            yield _gauge(
                "kvm_processes_limit",
                "Most processes the kernel allows (Linux: the task limit, as for threads)" + AS_OF,
                lim.max_procs,
            )
            yield _gauge(
                "kvm_threads_limit",
                "Most threads the kernel allows (Linux: tasks, min(pid_max - 1, threads-max))"
                + AS_OF,
                lim.max_threads,
            )
            if lim.memory_bytes is not None:
                yield _gauge(
                    "kvm_memory_total_bytes",
                    "Physical memory of the host in bytes" + AS_OF,
                    lim.memory_bytes,
                )

    def _health(self, snap: Snapshot) -> Iterator[Metric]:
        yield _gauge("kvm_up", "1 if every part of the last poll succeeded, else 0.", snap.up)
        success = GaugeMetricFamily(
            "kvm_poll_success",
            "1 if this part of the last poll succeeded, else 0.",
            labels=["collector"],
        )
        duration = GaugeMetricFamily(
            "kvm_poll_duration_seconds",
            "Seconds this part of the last poll took.",
            labels=["collector"],
        )
        errors = CounterMetricFamily(
            "kvm_poll_errors",
            "Failed polls of this part since the exporter started.",
            labels=["collector"],
        )
        for part in (*COLLECTORS, *(p for p in snap.success if p not in COLLECTORS)):
            if part in snap.success:
                success.add_metric([part], snap.success[part])
                duration.add_metric([part], snap.duration[part])
            errors.add_metric([part], snap.errors.get(part, 0))
        yield success
        yield duration
        yield errors
        yield CounterMetricFamily(
            "kvm_polls", "Polls run since the exporter started.", value=snap.polls
        )
        yield CounterMetricFamily(
            "kvm_poll_overruns",
            "Polls that took longer than the poll interval (scrapes meanwhile got the previous "
            "poll's data) since the exporter started.",
            value=snap.overruns,
        )
        if snap.last_success is not None:
            yield _gauge(
                "kvm_last_successful_poll_timestamp_seconds",
                "Unix time in seconds of the last poll in which every part succeeded.",
                snap.last_success,
            )

    def _meta(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "kvm_exporter_build_info",
            "Always 1; labels tell the version, the source and the Python running it.",
            labels=["version", "source", "python_version"],
        )
        info.add_metric([__version__, self._source_name(), platform.python_version()], 1)
        yield info
        status = self._reload_status()
        yield _gauge(
            "kvm_config_last_reload_successful",
            "1 if the last configuration load succeeded, else 0.",
            status.successful,
        )
        yield CounterMetricFamily(
            "kvm_config_reload_failures",
            "Failed configuration reloads (each left the previous one in force)"
            " since the exporter started.",
            value=status.failures,
        )
        yield _gauge(
            "kvm_config_last_reload_success_timestamp_seconds",
            "Unix time in seconds of the last successful configuration load.",
            status.last_success,
        )


class VisibilityCollector(Collector):
    """``kvm_process_visibility_restricted``: the restrictions found at start or last reload."""

    def __init__(self, visibility: Callable[[], Visibility]) -> None:
        self._visibility = visibility

    def collect(self) -> Iterator[Metric]:
        found = self._visibility()
        if not found:  # nothing checked: a procfs copy, a crash dump
            return
        family = GaugeMetricFamily(
            "kvm_process_visibility_restricted",
            "1 if this kernel restriction hides processes from the exporter (its counts are"
            " short), 0 if it was checked and does not; checked at start and on reload.",
            labels=["reason"],
        )
        for reason, applies in sorted(found.items()):
            family.add_metric([reason], applies)
        yield family


class OwnUsageCollector(Collector):
    """The exporter's own ``process_*`` metrics, named as every Prometheus exporter names them.

    A source with ``own_usage()`` answers them (libkvm: the exporter's own kinfo_proc, as
    FreeBSD has no /proc); otherwise prometheus_client's ProcessCollector reads /proc/self.
    """

    def __init__(self, source: Callable[[], Source]) -> None:
        self._source = source
        self._proc = ProcessCollector(registry=None)

    def collect(self) -> Iterator[Metric]:
        own_usage: Callable[[], OwnUsage] | None = getattr(self._source(), "own_usage", None)
        if own_usage is None:
            yield from self._proc.collect()
            return
        try:
            usage = own_usage()
        except SourceError as err:
            log.warning("process metrics left out: %s", err)
            return
        yield CounterMetricFamily(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            value=usage.cpu_seconds,
        )
        yield _gauge(
            "process_virtual_memory_bytes", "Virtual memory size in bytes.", usage.virtual_bytes
        )
        yield _gauge(
            "process_resident_memory_bytes", "Resident memory size in bytes.", usage.resident_bytes
        )
        yield _gauge(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            usage.start_time,
        )
        if usage.open_fds is not None:
            yield _gauge("process_open_fds", "Number of open file descriptors.", usage.open_fds)
        yield _gauge("process_max_fds", "Maximum number of open file descriptors.", usage.max_fds)
