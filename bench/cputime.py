"""CPU time of a callable, measured the way floor.c times itself."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from typing import Any, cast

from kvm_exporter import memory
from kvm_exporter.poller import Poller, Settings
from kvm_exporter.records import Source, Survey


def as_the_service() -> None:
    """Allocate as ``kvm_exporter`` does when it serves (``memory.use_c_allocator``): this
    script starts again under the C library's allocator, unless ``PYTHONMALLOC`` says
    otherwise. First thing in ``main``."""
    memory.configure()
    memory.use_c_allocator()


def median_ms(run: Callable[[], object], repeat: int) -> float:
    """Median process CPU (user + system) of ``repeat`` calls of ``run``, in milliseconds."""
    times = []
    for _ in range(repeat):
        start = time.process_time()
        run()
        times.append(time.process_time() - start)
    return round(statistics.median(times) * 1000, 3)


class Churn:
    """``source``, but each :meth:`churn` makes a tenth of its processes new for the next
    poll: their usage records' start moved by one unit (the start's low byte, at offset 8 in
    both sources' rows), as if each pid had been reused, so the poll names them afresh."""

    def __init__(self, source: Source) -> None:
        self._source = source
        self._moved: dict[bytes, bytes] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)

    def churn(self) -> None:
        """Pick this poll's new processes (untimed)."""
        real = {self._moved.get(r, r): r for r in self._source.survey().usage}
        for record in random.sample(sorted(real), len(real) // 10):
            now = self._moved.get(record, record)
            self._moved[record] = now[:8] + bytes([(now[8] + 1) % 256]) + now[9:]

    def survey(self) -> Survey:
        survey = self._source.survey()
        return survey._replace(usage=[self._moved.get(r, r) for r in survey.usage])


def group_poll_costs(source: Source, settings: Settings, polls: int) -> dict[str, float]:
    """CPU of polls with groups, in milliseconds: the first (every process named), the
    steady state, with a tenth of the processes new each poll (median), and a census-only
    poll of the same source for comparison; plus the processes grouped and the groups."""
    churned = Churn(source)
    poller = Poller(cast(Source, churned), settings)
    start = time.process_time()
    poller.poll()
    first = (time.process_time() - start) * 1000
    steady = median_ms(poller.poll, polls)
    churn = []
    for _ in range(polls):
        churned.churn()
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
