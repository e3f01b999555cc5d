"""node_exporter's names for the same data, for dashboards built on node_exporter (opt-in).

With ``compat: [node_exporter]`` the exporter also serves what node_exporter's ``processes``
collector (``collector/processes_linux.go``: Linux only, off by default) serves, with its
label and value conventions: ``node_processes_state`` has one series per state letter that
occurs, as ``ps`` prints it; pids count processes and threads sum their threads. On FreeBSD,
where node_exporter has no ``stat`` collector, ``node_procs_running`` and
``node_procs_blocked`` come too. ``node_load1/5/15`` are never served: node_exporter's
``loadavg`` collector has them on FreeBSD and Linux alike, and two exporters must not serve
one series. ``node_forks_total`` is not served: no source reads the fork counters.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .collector import AS_OF
from .poller import Poller, Snapshot

NODE_EXPORTER = "node_exporter"

STATE_LETTERS = {
    "running": "R",
    "new": "R",  # FreeBSD's ps prints SIDL as R
    "sleeping": "S",
    "idle": "I",
    "uninterruptible": "D",
    "lock": "L",
    "waiting": "W",
    "stopped": "T",
    "traced": "t",
    "zombie": "Z",
    "dead": "X",
    "parked": "P",
    "unknown": "?",
}
"""Each state word (``states.STATES``) as the letter ps prints for it: on Linux the letter of
/proc/PID/stat node_exporter reports, on FreeBSD the letter of ``ps -o state``."""

FREEBSD_SOURCES = ("libkvm",)
"""Sources whose host has no node_exporter ``stat`` collector (no node_procs_*)."""


def state_letters(processes: dict[tuple[str, ...], int], state_at: int) -> dict[str, int]:
    """Processes per state letter, only letters with processes (node_exporter's way)."""
    letters: dict[str, int] = {}
    for key, count in processes.items():
        if count:
            letter = STATE_LETTERS[key[state_at]]
            letters[letter] = letters.get(letter, 0) + count
    return letters


def node_metrics(snap: Snapshot, freebsd: bool) -> Iterator[Metric]:
    """node_exporter's process metrics from ``snap``; a part the last poll lost is left out."""
    if snap.counts is not None:
        counts = snap.counts
        yield GaugeMetricFamily(
            "node_processes_pids", "Processes." + AS_OF, value=sum(counts.processes.values())
        )
        yield GaugeMetricFamily(
            "node_processes_threads",
            "Threads of all processes." + AS_OF,
            value=sum(counts.threads.values()),
        )
        if "state" in counts.labels:
            letters = state_letters(counts.processes, counts.labels.index("state"))
            state = GaugeMetricFamily(
                "node_processes_state", "Processes per state letter." + AS_OF, labels=["state"]
            )
            for letter in sorted(letters):
                state.add_metric([letter], letters[letter])
            yield state
            if freebsd:
                yield GaugeMetricFamily(
                    "node_procs_running",
                    "Processes in the run queue." + AS_OF,
                    value=letters.get("R", 0),
                )
                yield GaugeMetricFamily(
                    "node_procs_blocked",
                    "Processes in uninterruptible sleep." + AS_OF,
                    value=letters.get("D", 0),
                )
    if snap.limits is not None:
        yield GaugeMetricFamily(
            "node_processes_max_processes",
            "Most processes the kernel allows.",
            value=snap.limits.max_procs,
        )
        yield GaugeMetricFamily(
            "node_processes_max_threads",
            "Most threads the kernel allows.",
            value=snap.limits.max_threads,
        )


class NodeCollector(Collector):
    """Serves :func:`node_metrics` of the poller's snapshot while its settings ask for it."""

    def __init__(self, poller: Poller) -> None:
        self._poller = poller

    def collect(self) -> Iterator[Metric]:
        if NODE_EXPORTER in self._poller.settings.compat:
            freebsd = self._poller.source.name in FREEBSD_SOURCES
            yield from node_metrics(self._poller.scraped(), freebsd)
