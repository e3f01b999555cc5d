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
- ``records_to_counts_cpu_ms``: ``aggregate_cpu_ms`` less ``getprocs_cpu_ms``, the aggregation
  proper: from the records the library returned to the label groups.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import sys
import tempfile
from collections import Counter
from functools import partial
from typing import Any

from cputime import median_ms

from kvm_exporter.aggregate import Counts, aggregate, user_names
from kvm_exporter.config import LibkvmConfig
from kvm_exporter.records import Census, Kind, Proc
from kvm_exporter.sources.kvm_cdef import ffi
from kvm_exporter.sources.libkvm import LibkvmSource


def census_all(sources: list[LibkvmSource]) -> Census:
    """The census of every source, summed: one host's processes split over several fakes."""
    total: Counter[Kind] = Counter()
    for source in sources:
        total.update(source.census())
    return total


def poll(sources: list[LibkvmSource], names: Any = None) -> Counts:
    """What a poll does: the census, then the label groups."""
    return aggregate(census_all(sources), ("user", "tty", "state"), 1000, names)


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
            f"threads={rng.choice((1, 1, 1, 4))} rss=100 size=4096 comm=p{pid % 50}"
        )
    return "\n".join(lines) + "\n"


def read_all(sources: list[LibkvmSource]) -> list[Proc]:
    return [p for source in sources for p in source.procs()]


def main() -> None:
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
                result["records_to_counts_cpu_ms"] = round(
                    result["aggregate_cpu_ms"] - result["getprocs_cpu_ms"], 3
                )
            finally:
                for source in sources:
                    source.close()
            print(json.dumps(result))


if __name__ == "__main__":
    main()
