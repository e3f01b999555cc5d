"""CPU per poll of kvm_exporter's procfs source, in-process, the way floor.c times itself.

One untimed warm-up poll, then ``--polls`` timed ones; prints one JSON object with the
median process CPU (user+system), in milliseconds, of a whole poll (the census, aggregation,
resources per user, load, swap, limits) with the C census when ``_procscan`` is built, of
the same poll without resources (counts only), of the poll with the census in Python, and of
``procs()`` alone (full records, ``status`` read too). Resource polls are steady-state: the
processes are tracked already (the warm-up poll saw them).
"""

from __future__ import annotations

import argparse
import json

from cputime import as_the_service, median_ms

from kvm_exporter.poller import Poller, Settings
from kvm_exporter.sources import procfs


def main() -> None:
    as_the_service()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--polls", type=int, default=20)
    args = parser.parse_args()
    source = procfs.ProcfsSource()
    poller = Poller(source, Settings())
    assert poller.poll().up, "a poll failed"
    compiled = procfs._lib
    result = {
        "pids": len(source.procs()),
        "compiled": compiled is not None,
        "poll_cpu_ms": median_ms(poller.poll, args.polls),  # the poll above warmed it up
        "tracked": len(poller._accounting.tracker) if poller._accounting else 0,
    }
    counts_only = Poller(source, Settings(resources=None))
    counts_only.poll()
    result["poll_counts_only_cpu_ms"] = median_ms(counts_only.poll, args.polls)
    procfs._lib = None  # the pure-Python census, as without a C compiler at install
    poller.poll()  # warm-up
    result["poll_python_cpu_ms"] = median_ms(poller.poll, args.polls)
    procfs._lib = compiled
    result["procs_cpu_ms"] = median_ms(source.procs, args.polls)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
