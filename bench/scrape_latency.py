"""Scrape latency of a /metrics URL with 1 and 16 concurrent scrapers, measured by wrk.

Each scraper is one keep-alive connection scraping back to back (wrk, closed loop), so with
16 of them every request waits behind up to 15 others: the worst case of 16 Prometheus
servers scraping at once. Prints one JSON object: per concurrency, median and p99 in ms and
requests per second.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess

UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def to_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"unexpected wrk duration {text!r}")
    return round(float(match[1]) * UNITS[match[2]], 3)


def wrk(url: str, connections: int, seconds: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    rps = re.search(r"^Requests/sec:\s+(\S+)", out, re.M)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if rps is None or len(pct) != 2:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    return {
        "p50_ms": to_ms(pct["50"]),
        "p99_ms": to_ms(pct["99"]),
        "rps": float(rps[1]),
        "non_2xx": int(bad[1]) if bad else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=int, default=16, help="per concurrency (default 16)")
    args = parser.parse_args()
    print(json.dumps({str(c): wrk(args.url, c, args.seconds) for c in args.connections}))


if __name__ == "__main__":
    main()
