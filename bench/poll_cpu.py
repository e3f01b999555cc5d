"""CPU per poll of kvm_exporter's procfs source, in-process, the way floor.c times itself.

One untimed warm-up poll, then ``--polls`` timed ones; prints one JSON object with the
median process CPU (user+system) of a whole poll (procs, aggregation, load, swap, limits)
and of ``procs()`` alone, in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from kvm_exporter.poller import Poller, Settings
from kvm_exporter.sources.procfs import ProcfsSource


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--polls", type=int, default=20)
    args = parser.parse_args()
    source = ProcfsSource()
    poller = Poller(source, Settings())
    poller.poll()
    polls, scans = [], []
    for _ in range(args.polls):
        start = time.process_time()
        snap = poller.poll()
        polls.append(time.process_time() - start)
        start = time.process_time()
        procs = source.procs()
        scans.append(time.process_time() - start)
    assert snap.up, snap.success
    print(
        json.dumps(
            {
                "pids": len(procs),
                "poll_cpu_ms": round(statistics.median(polls) * 1000, 3),
                "procs_cpu_ms": round(statistics.median(scans) * 1000, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
