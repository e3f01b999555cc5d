"""FreeBSD path: read and aggregate 10,000 and 100,000 ``kinfo_proc`` records.

The records come from the fake libkvm of the tests (``tests/fakelib.py``, the same cffi code
path as on FreeBSD), fed a generated scenario: uids, ttys and states spread the way a busy
multi-user host has them. The fake holds at most 32,768 processes (``MAXPROCS`` in
``fakekvm.c``), so a larger size is read in chunks of 25,000 from as many scenarios (distinct
pids) and concatenated. Prints one JSON object per size: the median CPU of
``LibkvmSource.procs()`` (kvm_getprocs plus the copy into records) and of ``aggregate()``
over them, in milliseconds: with no name cache (each call asks the password database for its
45 uids, 42 of them without an entry) and with a warm one, as the poller calls it (it keeps
uid-to-name lookups for ``NAMES_TTL``, 5 minutes).
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
from collections.abc import Callable
from functools import partial
from typing import Any

from kvm_exporter.aggregate import Counts, aggregate, user_names
from kvm_exporter.config import LibkvmConfig
from kvm_exporter.records import Proc, census_of
from kvm_exporter.sources.libkvm import LibkvmSource


def records_to_counts(procs: list[Proc], names: Any = None) -> Counts:
    """What a poll does with the records: their census, then the label groups."""
    return aggregate(census_of(procs), ("user", "tty", "state"), 1000, names)


TESTS = pathlib.Path(__file__).resolve().parent.parent / "tests"
STATS = ["SSLEEP"] * 8 + ["SRUN", "SWAIT", "SLOCK", "SSTOP", "SZOMB", "SIDL"]


CHUNK = 25_000


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


def median_ms(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.process_time()
        run()
        times.append(time.process_time() - start)
    return round(statistics.median(times) * 1000, 3)


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
                procs = read_all(sources)
                names = user_names()
                records_to_counts(procs, names)  # warms the name cache
                result = {
                    "records": len(procs),
                    "scenarios": len(sources),
                    "groups": len(records_to_counts(procs).processes),
                    "procs_cpu_ms": median_ms(partial(read_all, sources), args.repeat),
                    "aggregate_cpu_ms": median_ms(partial(records_to_counts, procs), args.repeat),
                    "aggregate_warm_names_cpu_ms": median_ms(
                        partial(records_to_counts, procs, names), args.repeat
                    ),
                }
            finally:
                for source in sources:
                    source.close()
            print(json.dumps(result))


if __name__ == "__main__":
    main()
