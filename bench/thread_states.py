"""CPU of process-exporter's thread states (issue 21): ``ProcfsSource.thread_states`` over
processes of many threads, the reads a poll adds under ``compat: [process_exporter]`` for the
named processes of two or more threads.

    python bench/thread_states.py [--processes 10] [--threads 1000] [--repeats 11]

Prints the median CPU of one pass over every process, and per thread.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from cputime import as_the_service

from kvm_exporter.sources.procfs import ProcfsSource

THREADED = """import sys, threading, time
for _ in range(int(sys.argv[1]) - 1):
    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


def main() -> None:
    as_the_service()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--processes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    kids = [
        subprocess.Popen(
            [sys.executable, "-c", THREADED, str(args.threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for _ in range(args.processes)
    ]
    try:
        for kid in kids:
            assert kid.stdout is not None and kid.stdout.readline() == b"ready\n"
        source = ProcfsSource()
        times, threads = [], 0
        for _ in range(args.repeats):
            start = time.process_time()
            threads = sum(len(source.thread_states(kid.pid) or ()) for kid in kids)
            times.append(time.process_time() - start)
        median = statistics.median(times)
        print(
            f"{args.processes} processes x {args.threads} threads = {threads} threads: "
            f"median CPU {median * 1000:.1f} ms a pass, {median / threads * 1e6:.1f} us a thread"
        )
    finally:
        for kid in kids:
            kid.kill()
            kid.wait()


if __name__ == "__main__":
    main()
