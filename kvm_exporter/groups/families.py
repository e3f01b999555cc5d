"""Metric families of the named process groups, under kvm_namegroup_* and, with
``compat: [process_exporter]``, under process-exporter's ``namedprocess_namegroup_*`` names
and labels, so its dashboards work unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.registry import Collector

from ..collector import AS_OF, counter_families, label_value, labelled_gauge
from ..config import PROCESS_EXPORTER
from ..poller import Poller, Snapshot
from ..states import PROCESS_EXPORTER_STATE, PROCESS_EXPORTER_STATES
from .details import DetailCounts
from .tracker import GroupCounts


def _utf8(values: dict[str, int] | dict[str, float]) -> dict[str, float]:
    """``values`` keyed by label values made UTF-8; names that become equal add up."""
    merged: dict[str, float] = {}
    for group, value in values.items():
        key = label_value(group)
        merged[key] = merged.get(key, 0) + value
    return merged


def _per_group(
    name: str, doc: str, label: str, values: dict[str, int] | dict[str, float]
) -> Metric:
    return labelled_gauge(name, doc, (label,), {(group,): v for group, v in values.items()})


def kvm_metrics(groups: GroupCounts) -> Iterator[Metric]:
    yield _per_group(
        "kvm_namegroup_processes", "Processes per named group", "group", groups.processes
    )
    yield _per_group(
        "kvm_namegroup_threads", "Threads of the processes per named group", "group", groups.threads
    )
    yield labelled_gauge(
        "kvm_namegroup_state_processes",
        "Processes per named group and state (states with processes only)",
        ("group", "state"),
        groups.states,
    )
    yield _per_group(
        "kvm_namegroup_resident_memory_bytes",
        "Resident memory of the processes per named group, summed",
        "group",
        groups.resident_bytes,
    )
    yield _per_group(
        "kvm_namegroup_virtual_memory_bytes",
        "Virtual memory size of the processes per named group, summed",
        "group",
        groups.virtual_bytes,
    )
    yield _per_group(
        "kvm_namegroup_oldest_start_time_seconds",
        "Unix time at which the oldest process of the group started",
        "group",
        groups.oldest_start,
    )
    yield from counter_families(
        {c: {(g,): v for g, v in totals.items()} for c, totals in groups.counters.items()},
        ("group",),
        "namegroup",
    )
    yield GaugeMetricFamily(
        "kvm_namegroup_folded_groups",
        "Named groups folded into 'other' to stay under max_series" + AS_OF,
        value=groups.folded,
    )
    if groups.details is not None:
        yield from _kvm_details(groups.details)
    yield CounterMetricFamily(
        "kvm_namegroup_argv_unreadable",
        "Processes since the exporter started whose arguments could not be read"
        " (named by their comm instead).",
        value=groups.unreadable,
    )


_KVM_GAUGES = {
    "open_fds": ("kvm_namegroup_open_fds", "Open file descriptors of the named group's processes"),
    "fd_ratio": (
        "kvm_namegroup_worst_fd_ratio",
        "Highest ratio of open file descriptors to their soft limit (RLIMIT_NOFILE) among the"
        " named group's processes (0 where unlimited or not readable)",
    ),
    "swap_bytes": (
        "kvm_namegroup_swapped_memory_bytes",
        "Swapped out memory of the named group's processes, summed",
    ),
    "proportional_bytes": (
        "kvm_namegroup_proportional_resident_memory_bytes",
        "Resident memory of the named group's processes, a page shared by N processes counted"
        " 1/N (PSS), summed",
    ),
    "proportional_swap_bytes": (
        "kvm_namegroup_proportional_swapped_memory_bytes",
        "Swapped memory of the named group's processes, a page shared by N processes counted"
        " 1/N (SwapPss), summed",
    ),
}
"""Our name and HELP of each gauge of the details (``details.GAUGES``)."""


def _kvm_details(details: DetailCounts) -> Iterator[Metric]:
    for field, values in details.gauges.items():
        name, doc = _KVM_GAUGES[field]
        yield _per_group(name, doc, "group", values)
    refused = CounterMetricFamily(
        "kvm_namegroup_details_refused",
        "Reads of a named process's details the kernel refused, since the exporter started,"
        " by file (another user's io, fd and smaps_rollup need ptrace access)",
        labels=["file"],
    )
    for file, count in sorted(details.refused.items()):
        refused.add_metric([file], count)
    yield refused


_PE_MEMTYPES = {
    "swap_bytes": "swapped",
    "proportional_bytes": "proportionalResident",
    "proportional_swap_bytes": "proportionalSwapped",
}
"""process-exporter's ``memtype`` of each memory gauge of the details."""


def process_exporter_metrics(groups: GroupCounts) -> Iterator[Metric]:
    """process-exporter's names for what both exporters measure alike. ``states`` counts as
    process-exporter does: each process by its (first thread's) state, and each thread of a
    process of two or more threads again by its own (where the source reads thread states:
    Linux; on FreeBSD processes only)."""
    yield _per_group(
        "namedprocess_namegroup_num_procs",
        "number of processes in this group",
        "groupname",
        groups.processes,
    )
    yield _per_group(
        "namedprocess_namegroup_num_threads", "Number of threads", "groupname", groups.threads
    )
    yield _per_group(
        "namedprocess_namegroup_oldest_start_time_seconds",
        "start time in seconds since 1970/01/01 of oldest process in group",
        "groupname",
        groups.oldest_start,
    )
    memory = GaugeMetricFamily(
        "namedprocess_namegroup_memory_bytes",
        "number of bytes of memory in use" + AS_OF,
        labels=["groupname", "memtype"],
    )
    memtypes: list[tuple[str, dict[str, int] | dict[str, float]]] = [
        ("resident", groups.resident_bytes),
        ("virtual", groups.virtual_bytes),
    ]
    gauges = {} if groups.details is None else groups.details.gauges
    memtypes += [(_PE_MEMTYPES[f], v) for f, v in gauges.items() if f in _PE_MEMTYPES]
    for memtype, values in memtypes:
        for group, value in sorted(_utf8(values).items()):
            memory.add_metric([group, memtype], value)
    yield memory
    if "open_fds" in gauges:
        yield _per_group(
            "namedprocess_namegroup_open_filedesc",
            "number of open file descriptors for this group",
            "groupname",
            gauges["open_fds"],
        )
        yield _per_group(
            "namedprocess_namegroup_worst_fd_ratio",
            "the worst (closest to 1) ratio between open fds and max fds among all procs in"
            " this group",
            "groupname",
            gauges["fd_ratio"],
        )
    states = GaugeMetricFamily(
        "namedprocess_namegroup_states",
        "Number of processes in states Running, Sleeping, Waiting, Zombie, or Other" + AS_OF,
        labels=["groupname", "state"],
    )
    by_state: dict[tuple[str, str], int] = {}
    for group in groups.processes:
        for pe_state in PROCESS_EXPORTER_STATES:
            by_state[label_value(group), pe_state] = 0
    for (group, state), count in chain(groups.states.items(), groups.thread_states.items()):
        key = (label_value(group), PROCESS_EXPORTER_STATE.get(state, "Other"))
        by_state[key] += count
    for key in sorted(by_state):
        states.add_metric(key, by_state[key])
    yield states
    yield from _process_exporter_counters(groups.counters)


_PE_COUNTERS = {
    ("cpu", "user"): ("cpu_seconds", "Cpu user usage in seconds", ("mode", "user")),
    ("cpu", "system"): ("cpu_seconds", "Cpu user usage in seconds", ("mode", "system")),
    ("page_faults", "major"): ("major_page_faults", "Major page faults", None),
    ("page_faults", "minor"): ("minor_page_faults", "Minor page faults", None),
    ("context_switches", "voluntary"): (
        "context_switches",
        "Context switches",
        ("ctxswitchtype", "voluntary"),
    ),
    ("context_switches", "involuntary"): (
        "context_switches",
        "Context switches",
        ("ctxswitchtype", "nonvoluntary"),
    ),
    ("io_bytes", "read"): ("read_bytes", "number of bytes read by this group", None),
    ("io_bytes", "write"): ("write_bytes", "number of bytes written by this group", None),
}
"""process-exporter's counter names (``collector/process_collector.go``) for ours."""


def _process_exporter_counters(
    counters: dict[tuple[str, str], dict[str, float]],
) -> Iterator[Metric]:
    families: dict[str, CounterMetricFamily] = {}
    for column, totals in counters.items():
        known = _PE_COUNTERS.get(column)
        if known is None:
            continue
        name, doc, extra = known
        family = families.get(name)
        if family is None:
            labels = ["groupname"] + ([extra[0]] if extra else [])
            family = families[name] = CounterMetricFamily(
                "namedprocess_namegroup_" + name, doc, labels=labels
            )
        for group, total in sorted(_utf8(totals).items()):
            family.add_metric([group] + ([extra[1]] if extra else []), total)
    yield from families.values()


class GroupCollector(Collector):
    """Serves the groups of the poller's snapshot; nothing when groups are off."""

    def __init__(self, poller: Poller) -> None:
        self._poller = poller

    def collect(self) -> Iterator[Metric]:
        snap = self._poller.scraped()
        groups = snap.groups
        compat = PROCESS_EXPORTER in self._poller.settings.compat
        if compat and self._poller.settings.groups:
            yield from _scrape_errors(snap, groups)
        if groups is None:
            return
        yield from kvm_metrics(groups)
        if compat:
            yield from process_exporter_metrics(groups)


def _scrape_errors(snap: Snapshot, groups: GroupCounts | None) -> Iterator[Metric]:
    """process-exporter's ``namedprocess_scrape_*`` counters: polls whose processes could
    not be read (its "no proc metrics collected during a cycle"); of the details, the named
    processes whose ``status`` or ``limits`` were refused (its failed reads of a process,
    which it counts at its first poll only) and those whose other files were; those two
    not after a poll without groups, which has no count of them (not 0: a counter's dip).
    Untyped where process-exporter's are counters: prometheus_client serves a counter as
    ``NAME_total`` only."""
    yield UnknownMetricFamily(
        "namedprocess_scrape_errors",
        "general scrape errors: no proc metrics collected during a cycle",
        value=snap.errors.get("procs", 0) + snap.errors.get("groups", 0),
    )
    if groups is None:
        return
    details = groups.details
    for name, doc, value in (
        (
            "namedprocess_scrape_procread_errors",
            "incremented each time a proc's metrics collection fails",
            0 if details is None else details.procread_errors,
        ),
        (
            "namedprocess_scrape_partial_errors",
            "incremented each time a tracked proc's metrics collection fails partially,"
            " e.g. unreadable I/O stats",
            0 if details is None else details.partial_errors,
        ),
    ):
        yield UnknownMetricFamily(name, doc, value=value)
