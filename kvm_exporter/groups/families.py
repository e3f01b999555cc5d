"""Metric families of the named process groups, under kvm_namegroup_* and, with
``compat: [process_exporter]``, under process-exporter's ``namedprocess_namegroup_*`` names
and labels, so its dashboards work unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..collector import AS_OF, counter_families, label_value, labelled_gauge
from ..config import PROCESS_EXPORTER
from ..poller import Poller
from ..states import PROCESS_EXPORTER_STATE, PROCESS_EXPORTER_STATES
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
    yield CounterMetricFamily(
        "kvm_namegroup_argv_unreadable",
        "Processes since the exporter started whose arguments could not be read"
        " (named by their comm instead).",
        value=groups.unreadable,
    )


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
    for memtype, values in (("resident", groups.resident_bytes), ("virtual", groups.virtual_bytes)):
        for group, value in sorted(_utf8(values).items()):
            memory.add_metric([group, memtype], value)
    yield memory
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
        groups = self._poller.scraped().groups
        if groups is None:
            return
        yield from kvm_metrics(groups)
        if PROCESS_EXPORTER in self._poller.settings.compat:
            yield from process_exporter_metrics(groups)
