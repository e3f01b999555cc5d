"""CPU time of a callable, measured the way floor.c times itself."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

from kvm_exporter.poller import Poller, Settings
from kvm_exporter.records import Source


def median_ms(run: Callable[[], object], repeat: int) -> float:
    """Median process CPU (user + system) of ``repeat`` calls of ``run``, in milliseconds."""
    times = []
    for _ in range(repeat):
        start = time.process_time()
        run()
        times.append(time.process_time() - start)
    return round(statistics.median(times) * 1000, 3)


def group_poll_costs(source: Source, settings: Settings, polls: int) -> dict[str, float]:
    """CPU of polls with groups, in milliseconds: the first (every process named), the
    steady state, with a tenth of the processes new each poll (median), and a census-only
    poll of the same source for comparison; plus the processes grouped and the groups."""
    poller = Poller(source, settings)
    start = time.process_time()
    poller.poll()
    first = (time.process_time() - start) * 1000
    steady = median_ms(poller.poll, polls)
    grouper = poller._grouper
    assert grouper is not None
    churn = []
    for _ in range(polls):
        names = grouper._names
        for key in random.sample(sorted(names, key=str), len(names) // 10):
            del names[key]  # as if these processes were new: named afresh by the poll
        start = time.process_time()
        poller.poll()
        churn.append(time.process_time() - start)
    churn.sort()
    census_only = Poller(source, Settings())
    census_only.poll()
    groups = poller.snapshot().groups
    assert groups is not None
    return {
        "records": sum(groups.processes.values()),
        "groups": len(groups.processes),
        "first_poll_cpu_ms": round(first, 1),
        "steady_poll_cpu_ms": steady,
        "churn10_poll_cpu_ms": round(churn[len(churn) // 2] * 1000, 3),
        "census_poll_cpu_ms": median_ms(census_only.poll, polls),
    }
