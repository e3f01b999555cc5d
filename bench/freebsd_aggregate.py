"""FreeBSD path: read and aggregate 10,000 and 100,000 ``kinfo_proc`` records.

The records come from the fake libkvm of the tests (``tests/fakelib.py``, the same cffi code
path as on FreeBSD), fed a generated scenario: uids, ttys and states spread the way a busy
multi-user host has them. The fake holds at most 131,072 processes (``MAXPROCS`` in
``fakekvm.c``); a larger size is read in chunks from as many scenarios (distinct pids) and
concatenated (censuses summed). Prints one JSON object per size, median CPU in milliseconds
of:

- ``getprocs_cpu_ms``: the bare ``kvm_getprocs`` calls (the fake's own share of every read);
- ``procs_cpu_ms``: ``LibkvmSource.procs()`` (kvm_getprocs plus the copy into records);
- ``census_cpu_ms``: ``LibkvmSource.census()``, from the library call to the census;
- ``aggregate_cpu_ms``: what a poll does, ``census()`` then ``aggregate()``, with no name
  cache (each call asks the password database for its 45 uids, 42 of them without an entry);
- ``aggregate_warm_names_cpu_ms``: the same with a warm name cache, as the poller calls it
  (it keeps uid-to-name lookups for ``NAMES_TTL``, 5 minutes);
- ``records_to_counts_cpu_ms``: ``aggregate_cpu_ms`` less the ``kvm_getprocs`` of the same
  call (timed inside it: a median of differences, not a difference of medians, which a loaded
  host's noise in the fake's 60-90 ms would swamp), the aggregation proper: from the records
  the library returned to the label groups;
- ``resources_cpu_ms``: what a poll with resources per user does (one source only, up to
  131,072 records): ``survey()``, ``aggregate()`` of its census with warm names, and the
  accounting of its usage rows, steady state (every process seen by the previous poll, as
  on a host whose processes mostly idle between polls: the scenario does not change);
- ``resources_first_sight_cpu_ms``: the same with every process new (a fresh accounting);
- ``records_to_counts_and_resources_cpu_ms``: ``resources_cpu_ms`` less the ``kvm_getprocs``
  of the same call.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

from cputime import as_the_service, median_ms

from kvm_exporter.aggregate import Counts, aggregate, user_names
from kvm_exporter.config import LibkvmConfig
from kvm_exporter.records import Census, Kind, Proc
from kvm_exporter.sources.kvm_cdef import ffi
from kvm_exporter.sources.libkvm import LibkvmSource
from kvm_exporter.usage import Accounting


def census_all(sources: list[LibkvmSource]) -> Census:
    """The census of every source, summed: one host's processes split over several fakes."""
    total: Counter[Kind] = Counter()
    for source in sources:
        total.update(source.census())
    return total


def poll(sources: list[LibkvmSource], names: Any = None) -> Counts:
    """What a poll does: the census, then the label groups."""
    return aggregate(census_all(sources), ("user", "tty", "state"), 1000, names)


def with_resources(source: LibkvmSource, accounting: Accounting | None, names: Any) -> Counts:
    """A poll with resources per user; a fresh accounting (every process new) if None."""
    assert source.usage_spec is not None
    accounting = accounting or Accounting(source, ("user",), 1000, source.usage_spec)
    survey = source.survey()
    accounting.poll(survey, names)
    return aggregate(survey.census, ("user", "tty", "state"), 1000, names)


def beyond_library_ms(sources: list[LibkvmSource], run: Callable[[], object], repeat: int) -> float:
    """Median CPU of ``repeat`` calls of ``run`` less, per call, what its ``kvm_getprocs``
    calls took (timed around each)."""
    inside = [0.0]

    def timed(getprocs: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            start = time.process_time()
            try:
                return getprocs(*args)
            finally:
                inside[0] += time.process_time() - start

        return call

    for source in sources:
        source._getprocs = timed(source._getprocs)  # type: ignore[method-assign]
    try:
        times = []
        for _ in range(repeat):
            inside[0], start = 0.0, time.process_time()
            run()
            times.append(time.process_time() - start - inside[0])
    finally:
        for source in sources:
            del source._getprocs
    return round(statistics.median(times) * 1000, 3)


def getprocs_only(sources: list[LibkvmSource]) -> None:
    count = ffi.new("int *")
    for source in sources:
        with source._lock:
            source._lib.kvm_getprocs(source._kd, source._op, source._arg, count)


TESTS = pathlib.Path(__file__).resolve().parent.parent / "tests"
STATS = ["SSLEEP"] * 8 + ["SRUN", "SWAIT", "SLOCK", "SSTOP", "SZOMB", "SIDL"]


CHUNK = 131_072  # MAXPROCS of fakekvm.c


def scenario(first: int, n: int) -> str:
    rng = random.Random(first)
    uids = [0, 0, 0, 65534, 770, *range(1001, 1041)]
    ttys = ["none"] * 6 + [str(0x96 + i) for i in range(20)]
    lines = ["sysctl hw.pagesize 4096", "loadavg 1 1 1"]
    lines += [f"tty {0x96 + i} pts/{i}" for i in range(20)]
    for pid in range(first, first + n):
        lines.append(
            f"proc pid={pid} ppid=1 uid={rng.choice(uids)} tdev={rng.choice(ttys)} "
            f"stat={rng.choice(STATS)} tdflags=0x8 slptime={rng.choice((0, 30))} "
            f"threads={rng.choice((1, 1, 1, 4))} rss=100 size=4096 comm=p{pid % 50} "
            f"utime={rng.randrange(10**8)} stime={rng.randrange(10**7)} "
            f"minflt={rng.randrange(10**5)} nvcsw={rng.randrange(10**5)} start={pid}.5"
        )
    return "\n".join(lines) + "\n"


def read_all(sources: list[LibkvmSource]) -> list[Proc]:
    return [p for source in sources for p in source.procs()]


def main() -> None:
    as_the_service()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    sys.path.insert(0, str(TESTS))
    from fakelib import build_fake_libkvm

    with tempfile.TemporaryDirectory(prefix="kvm-bench-") as tmp:
        library = build_fake_libkvm(pathlib.Path(tmp))
        for n in args.sizes:
            sources = []
            for first in range(1, n + 1, CHUNK):
                path = pathlib.Path(tmp, f"{n}-{first}.scenario")
                path.write_text(scenario(first, min(CHUNK, n + 1 - first)))
                os.environ["FAKE_KVM_SCENARIO"] = str(path)
                sources.append(LibkvmSource(LibkvmConfig(library=str(library))))
            try:
                names = user_names()
                poll(sources, names)  # warms the name cache
                result = {
                    "records": sum(census_all(sources).values()),
                    "scenarios": len(sources),
                    "groups": len(poll(sources).processes),
                    "getprocs_cpu_ms": median_ms(partial(getprocs_only, sources), args.repeat),
                    "procs_cpu_ms": median_ms(partial(read_all, sources), args.repeat),
                    "census_cpu_ms": median_ms(partial(census_all, sources), args.repeat),
                    "aggregate_cpu_ms": median_ms(partial(poll, sources), args.repeat),
                    "aggregate_warm_names_cpu_ms": median_ms(
                        partial(poll, sources, names), args.repeat
                    ),
                }
                # Aggregation proper: from the records libkvm returned to the label groups.
                result["records_to_counts_cpu_ms"] = beyond_library_ms(
                    sources, partial(poll, sources), args.repeat
                )
                if len(sources) == 1:
                    (source,) = sources
                    assert source.usage_spec is not None
                    tracked = Accounting(source, ("user",), 1000, source.usage_spec)
                    with_resources(source, tracked, names)  # every process seen once
                    steady = partial(with_resources, source, tracked, names)
                    result["resources_cpu_ms"] = median_ms(steady, args.repeat)
                    result["resources_first_sight_cpu_ms"] = median_ms(
                        partial(with_resources, source, None, names), args.repeat
                    )
                    result["records_to_counts_and_resources_cpu_ms"] = beyond_library_ms(
                        sources, steady, args.repeat
                    )
            finally:
                for source in sources:
                    source.close()
            print(json.dumps(result))


if __name__ == "__main__":
    main()
