"""node_exporter's names for the same data, for dashboards built on node_exporter (opt-in).

With ``compat: [node_exporter]`` the exporter also serves what node_exporter's ``processes``
collector (``collector/processes_linux.go``: Linux only, off by default) serves, with its
HELP texts, labels and values: ``node_processes_state`` has one series per state letter that
occurs, as ``ps`` prints it; pids count processes and threads sum their threads; the limits
are ``kernel.pid_max`` and ``kernel.threads-max`` on Linux. Where that collector is on, these
names are its series twice: node_exporter reports a series its textfile collector repeats as
"collected before" and serves one of the two. On FreeBSD,
where node_exporter has no ``stat`` collector, ``node_procs_running`` and
``node_procs_blocked`` come too. ``node_load1/5/15`` are never served: node_exporter's
``loadavg`` collector has them on FreeBSD and Linux alike, and two exporters must not serve
one series. ``node_forks_total`` is not served: no source reads the fork counters.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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


NODE_HELP = {
    "node_processes_pids": "Number of PIDs",
    "node_processes_threads": "Allocated threads in system",
    "node_processes_state": "Number of processes in each state.",
    "node_processes_max_processes": "Number of max PIDs limit",
    "node_processes_max_threads": "Limit of threads in the system",
    "node_procs_running": "Number of processes in runnable state.",
    "node_procs_blocked": "Number of processes blocked waiting for I/O to complete.",
}
"""node_exporter's HELP text of each name, to the letter (``processes_linux.go``,
``stat_linux.go``): its registry refuses a textfile series whose HELP differs from its own
collector's for the same name."""


def _node_gauge(name: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, NODE_HELP[name], value=value)


def node_metrics(snap: Snapshot, freebsd: bool) -> Iterator[Metric]:
    """node_exporter's process metrics from ``snap``; a part the last poll lost is left out."""
    if snap.counts is not None:
        counts = snap.counts
        yield _node_gauge("node_processes_pids", sum(counts.processes.values()))
        yield _node_gauge("node_processes_threads", sum(counts.threads.values()))
        if "state" in counts.labels:
            letters = state_letters(counts.processes, counts.labels.index("state"))
            state = GaugeMetricFamily(
                "node_processes_state", NODE_HELP["node_processes_state"], labels=["state"]
            )
            for letter in sorted(letters):
                state.add_metric([letter], letters[letter])
            yield state
            if freebsd:
                yield _node_gauge("node_procs_running", letters.get("R", 0))
                yield _node_gauge("node_procs_blocked", letters.get("D", 0))
    if snap.limits is not None:
        lim = snap.limits
        # Linux: the two settings as node_exporter reads them, not the task limit they make.
        yield _node_gauge(
            "node_processes_max_processes", lim.max_procs if lim.pid_max is None else lim.pid_max
        )
        yield _node_gauge(
            "node_processes_max_threads",
            lim.max_threads if lim.threads_max is None else lim.threads_max,
        )


class NodeCollector(Collector):
    """Serves :func:`node_metrics` of the poller's snapshot while its settings ask for it."""

    def __init__(self, poller: Poller) -> None:
        self._poller = poller

    def collect(self) -> Iterator[Metric]:
        if NODE_EXPORTER in self._poller.settings.compat:
            freebsd = self._poller.source.name in FREEBSD_SOURCES
            yield from node_metrics(self._poller.scraped(), freebsd)
