"""Soak: 10,000 scrapes of an exporter collecting on every scrape (so 10,000 polls too),
while processes come and go; prints RSS along the way and its growth.

Growth is measured from the sample after the warm-up (the first ``--every`` scrapes, which
fill the allocator's pools and caches) to the last sample. The churn keeps ``--pool`` short
``sleep`` processes alive and replaces a few of them between scrapes, so pids, comms' owners
and counts change all the time.
"""

from __future__ import annotations

import argparse
import http.client
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque


def rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def churn(pool: int, stop: threading.Event) -> None:
    """Keep ``pool`` children alive, replacing the oldest few every 10 ms."""
    kids: deque[subprocess.Popen[bytes]] = deque()
    try:
        while not stop.is_set():
            while len(kids) < pool:
                kids.append(subprocess.Popen(["sleep", "300"]))
            for _ in range(max(pool // 20, 1)):
                old = kids.popleft()
                old.kill()
                old.wait()
            stop.wait(0.01)
    finally:
        for kid in kids:
            kid.kill()
            kid.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scrapes", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=500, help="RSS sample period, in scrapes")
    parser.add_argument("--pool", type=int, default=200)
    parser.add_argument("--port", type=int, default=19182)
    parser.add_argument("--groups", action="store_true", help="named groups too, one per comm")
    parser.add_argument(
        "--exporter", default=os.path.join(os.path.dirname(sys.executable), "kvm_exporter")
    )
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as config:
        config.write("interval: 0\n")
        if args.groups:  # process-exporter's pe-comm.yml, inline
            config.write("groups:\n  process_names: [{name: '{{.Comm}}', cmdline: ['.*']}]\n")
        config.flush()
        exporter = subprocess.Popen(
            [
                args.exporter,
                "--config.file",
                config.name,
                "--web.listen-address",
                f"127.0.0.1:{args.port}",
                "--log.level",
                "warn",
            ],
        )
        stop = threading.Event()
        churner = threading.Thread(target=churn, args=(args.pool, stop))
        try:
            conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=30)
            for _ in range(100):
                try:
                    conn.request("GET", "/metrics")
                    conn.getresponse().read()
                    break
                except OSError:
                    conn.close()
                    time.sleep(0.1)
            churner.start()
            samples: list[tuple[int, float]] = [(0, rss_mib(exporter.pid))]
            start = time.monotonic()
            for i in range(1, args.scrapes + 1):
                conn.request("GET", "/metrics")
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    raise RuntimeError(f"scrape {i}: HTTP {response.status}")
                if i % args.every == 0:
                    samples.append((i, rss_mib(exporter.pid)))
            elapsed = time.monotonic() - start
        finally:
            stop.set()
            if churner.is_alive():
                churner.join()
            exporter.terminate()
            exporter.wait()
    groups = ", named groups" if args.groups else ""
    print(f"{args.scrapes} scrapes (= polls) in {elapsed:.0f} s, churn pool {args.pool}{groups}")
    print("| scrapes | RSS MiB |\n|---:|---:|")
    for i, rss in samples:
        print(f"| {i} | {rss:.1f} |")
    base = samples[1][1] if len(samples) > 2 else samples[0][1]
    print(
        f"growth after warm-up ({samples[1][0]} scrapes): {samples[-1][1] - base:+.2f} MiB; "
        f"peak {max(r for _, r in samples):.1f} MiB"
    )


if __name__ == "__main__":
    main()
