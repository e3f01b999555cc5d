"""What the top processes (``top``, n 10) cost a poll, and what their series cost Prometheus.

Prints one JSON object per part:

- ``linux``: ``--processes`` idle processes (``idlekids`` from ``../shared/bench``, built with
  cc), and the median CPU of a steady poll of the live /proc without ``top`` and with it,
  measured alternately (one of each per round) so the host's load weighs on both alike
  (two polls without ``top`` measured so differ by up to 2%: noise), and what ranking adds
  to a steady poll, timed alone (``rank_cpu_ms``);
- ``freebsd``: the fake libkvm (``tests/fakelib.py``) with ``--records`` processes: the
  median CPU of a steady poll's ``survey()`` and accounting without and with ``top``, the
  first poll's (every process put), the steady poll's ranking alone, one full ranking of
  every process by memory (what the watch does when its candidates run out), and the top
  sets' series made from a poll's;
- ``churn``: 200 processes of nearly equal CPU and memory use, each poll jittering by up to
  ``jitter`` percent, 2,000 polls: the new top processes per poll and the processes per set,
  with the margin (:data:`kvm_exporter.top.MARGIN`) and with rank ``2 n`` alone (margin 0).
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from typing import Any

from cputime import as_the_service, median_ms

from kvm_exporter import top
from kvm_exporter.aggregate import user_names
from kvm_exporter.config import LibkvmConfig, TopConfig
from kvm_exporter.poller import Poller, Settings
from kvm_exporter.sources.libkvm import LibkvmSource
from kvm_exporter.sources.procfs import ProcfsSource
from kvm_exporter.usage import Accounting, Attribution, Tracker

HERE = pathlib.Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
SHARED = pathlib.Path(os.environ.get("SHARED_BENCH", HERE.parent.parent / "shared" / "bench"))
TOP = TopConfig(10, ("cpu", "memory"), 0)


def alternately(
    without: Callable[[], object], with_top: Callable[[], object], rounds: int
) -> dict[str, float]:
    """Median CPU in ms of each, one call of each per round (which goes first alternates),
    and the difference."""
    a, b = [], []
    for turn in range(rounds):
        for run in (without, with_top) if turn % 2 else (with_top, without):
            (a if run is without else b).append(median_ms(run, 1))
    a.sort()
    b.sort()
    base, more = a[rounds // 2], b[rounds // 2]
    return {
        "without_top_cpu_ms": base,
        "with_top_cpu_ms": more,
        "more_cpu_ms": round(more - base, 3),
        "more_percent": round(100 * (more - base) / base, 2),
    }


def linux(processes: int, rounds: int, tmp: str) -> dict[str, Any]:
    idlekids = pathlib.Path(tmp, "idlekids")
    subprocess.run(["cc", "-O2", "-o", idlekids, SHARED / "idlekids.c"], check=True)
    kids = subprocess.Popen(
        [idlekids, str(processes), pathlib.Path(tmp, "pids"), "3600"], stdout=subprocess.PIPE
    )
    try:
        assert kids.stdout is not None
        kids.stdout.readline()  # "ready N"
        without = Poller(ProcfsSource(), Settings())
        with_top = Poller(ProcfsSource(), Settings(top=TOP))
        without.poll()
        with_top.poll()
        result = {
            "processes": len(os.listdir("/proc")),
            **alternately(without.poll, with_top.poll, rounds),
        }
        snap = with_top.snapshot()
        assert snap.top is not None
        result["top_processes"] = len(snap.top.processes)
        accounting = with_top._accounting
        assert accounting is not None and accounting.tracker.watch is not None
        result["rank_cpu_ms"] = median_ms(accounting.tracker.watch.rank, rounds)
        return result
    finally:
        kids.send_signal(signal.SIGTERM)
        kids.wait()


def freebsd(records: int, rounds: int, tmp: str) -> dict[str, Any]:
    sys.path.insert(0, str(TESTS))
    sys.path.insert(0, str(HERE))
    from fakelib import build_fake_libkvm
    from freebsd_aggregate import scenario

    library = build_fake_libkvm(pathlib.Path(tmp))
    path = pathlib.Path(tmp, "top.scenario")
    rng = random.Random(22)  # each process its own resident size
    path.write_text(
        re.sub("rss=100 ", lambda _: f"rss={rng.randrange(50, 50000)} ", scenario(1, records))
    )
    os.environ["FAKE_KVM_SCENARIO"] = str(path)
    source = LibkvmSource(LibkvmConfig(library=str(library)))
    try:
        names = user_names()
        spec = source.usage_spec

        def poll(accounting: Accounting) -> None:
            accounting.poll(source.survey(), names)

        def first(with_top: bool) -> float:
            """The median first poll of five fresh accountings."""
            make = partial(Accounting, source, ("user",), 1000, spec, TOP if with_top else None)
            return median_ms(lambda: poll(make()), 5)

        without = Accounting(source, ("user",), 1000, spec)
        with_top = Accounting(source, ("user",), 1000, spec, TOP)
        poll(without)
        poll(with_top)
        result: dict[str, Any] = {"records": len(source.survey().usage)}
        result.update(alternately(partial(poll, without), partial(poll, with_top), rounds))
        result["first_poll_without_top_cpu_ms"] = first(False)
        result["first_poll_with_top_cpu_ms"] = first(True)
        watch = with_top.tracker.watch
        assert watch is not None
        rss = watch._rss
        full = partial(heapq.nlargest, top.CANDIDATES * TOP.n, rss, key=rss.__getitem__)
        result["full_memory_ranking_cpu_ms"] = median_ms(full, rounds)
        result["rank_cpu_ms"] = median_ms(watch.rank, rounds)
        stage = partial(with_top.top_processes, None)  # what the poller adds after the poll
        result["top_report_cpu_ms"] = median_ms(stage, rounds)
        return result
    finally:
        source.close()


def churn(jitter: float, margin: float, polls: int = 2000, n: int = 10) -> dict[str, float]:
    """New processes per poll and processes per set, per ranking, among 200 of equal use."""
    from test_usage import SPEC, row

    top.MARGIN = margin
    watch = top.Watch(n, ("cpu", "memory"), SPEC)
    tracker = Tracker(Attribution(lambda r, _: r[3]), SPEC, watch=watch)
    rng = random.Random(22)
    ticks = dict.fromkeys(range(1, 201), 0)
    before: dict[str, frozenset[int]] = {"cpu": frozenset(), "memory": frozenset()}
    new = size = 0
    for clock in range(polls):
        for pid in ticks:
            ticks[pid] += round(1000 * (1 + rng.uniform(-jitter, jitter)))
        rss = {pid: round(10000 * (1 + rng.uniform(-jitter, jitter))) for pid in ticks}
        tracker.update([row(p, 0, t, rss=rss[p]) for p, t in ticks.items()], clock)
        watch.rank()
        for by in before:
            now = watch.members(by)
            new += len(now - before[by]) if clock > 1 else 0
            size += len(now)
            before[by] = now
    return {"new_per_poll": round(new / 2 / (polls - 2), 2), "per_set": round(size / 2 / polls, 1)}


def main() -> None:
    as_the_service()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--processes", type=int, default=10_000)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--parts", nargs="+", default=["linux", "freebsd", "churn"])
    args = parser.parse_args()
    sys.path.insert(0, str(TESTS))
    margin = top.MARGIN
    with tempfile.TemporaryDirectory(prefix="kvm-top-") as tmp:
        if "linux" in args.parts:
            print(json.dumps({"linux": linux(args.processes, args.rounds, tmp)}))
        if "freebsd" in args.parts:
            print(json.dumps({"freebsd": freebsd(args.records, args.rounds, tmp)}))
    if "churn" in args.parts:
        for jitter in (0.0, 0.03, 0.1, 0.3, 0.6):
            rows = {f"margin_{m}": churn(jitter, m) for m in (margin, 0.0)}
            print(json.dumps({"churn": {"jitter": jitter, **rows}}))
        top.MARGIN = margin


if __name__ == "__main__":
    main()
