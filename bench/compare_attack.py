"""One attack against several exporters in the same run, alternating, several rounds: the
legitimate scraper's latency (a new connection per scrape, 20 a second) beside each.

For comparing two builds of kvm_exporter (say main and a branch, each installed in a venv
of its own) with node_exporter on a shared machine, where only ratios within one run mean
something. Rounds alternate the order of the targets. ``wrk`` (the attack) is ``wrk -t1
-c1000`` scraping back to back, whose own latency and rate are printed too; any other
attack is one of bench/attack.py's.

    python bench/compare_attack.py --attack wrk --rounds 3 \\
        --kvm main=/opt/venv-main/bin/python --kvm new=/opt/venv/bin/python \\
        [--node-exporter /usr/bin/prometheus-node-exporter] [--port 21100]

Run it from outside a source tree (``python -m kvm_exporter`` imports from the current
directory first). Prints a line per round and target, then the pooled p50/p90/p99/max.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests"))

from attack import cpu_seconds  # noqa: E402
from attack_support import scrape  # noqa: E402
from conftest import wait_until  # noqa: E402


def start(argv: list[str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [*argv, f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until(lambda: scrape(port, timeout=2)[0] == 200, 30, argv[0])
    return proc


def attacker(kind: str, port: int, seconds: int) -> subprocess.Popen[str]:
    if kind == "wrk":
        argv = ["wrk", "-t1", "-c1000", f"-d{seconds}s", "--timeout", "30s", "--latency"]
        argv.append(f"http://127.0.0.1:{port}/metrics")
    else:
        argv = [sys.executable, str(BENCH / "attack.py"), "attacker", kind, str(port)]
        argv.append(str(seconds))
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def wrk_summary(out: str) -> dict[str, str]:
    """wrk's own p50, p99, requests a second and socket errors."""
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    rate = re.search(r"^Requests/sec:\s+(\S+)", out, re.M)
    errors = re.search(r"Socket errors:.*", out)
    return {
        "wrk_p50": pct.get("50", ""),
        "wrk_p99": pct.get("99", ""),
        "wrk_rps": rate[1] if rate else "",
        "wrk_errors": errors[0] if errors else "",
    }


def measure(proc: subprocess.Popen[bytes], port: int, kind: str, seconds: int) -> dict[str, object]:
    attack = attacker(kind, port, seconds)
    time.sleep(1.0)  # let it build up
    cpu0, began = cpu_seconds(proc.pid), time.monotonic()
    times: list[float] = []
    failed = 0
    while time.monotonic() - began < seconds - 1.5:
        try:
            status, _, took = scrape(port, timeout=10)
        except (OSError, http.client.HTTPException):
            status = 0
        if status == 200:
            times.append(took * 1000)
        else:
            failed += 1
        time.sleep(0.05)
    cpu = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - began)
    out, _ = attack.communicate(timeout=60)
    time.sleep(1.0)
    times.sort()
    row: dict[str, object] = {"ok": len(times), "failed": failed, "cpu_pct": round(cpu * 100)}
    row.update(percentiles(times))
    if kind == "wrk":
        row.update(wrk_summary(out))
    return row | {"times": times}


def percentiles(times: list[float]) -> dict[str, float]:
    if not times:
        return {}
    at = lambda q: times[min(len(times) - 1, int(len(times) * q))]  # noqa: E731
    return {
        "p50": round(statistics.median(times), 1),
        "p90": round(at(0.9), 1),
        "p99": round(at(0.99), 1),
        "max": round(times[-1], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attack", default="wrk")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--kvm", action="append", default=[], metavar="NAME=PYTHON")
    parser.add_argument("--node-exporter", default=shutil.which("prometheus-node-exporter"))
    parser.add_argument("--port", type=int, default=21100, help="first of the ports used")
    args = parser.parse_args()
    argvs = {
        name: [python, "-m", "kvm_exporter"]
        for name, _, python in (spec.partition("=") for spec in args.kvm)
    }
    if args.node_exporter:  # a cheap exposition, as in bench/attack.py
        argvs["node_exporter"] = [
            args.node_exporter,
            "--collector.disable-defaults",
            "--collector.loadavg",
        ]
    ports = {name: args.port + i for i, name in enumerate(argvs)}
    procs = {name: start(argv, ports[name]) for name, argv in argvs.items()}
    pooled: dict[str, list[float]] = {name: [] for name in argvs}
    try:
        time.sleep(2.0)
        for round_ in range(args.rounds):
            names = list(argvs) if round_ % 2 == 0 else list(argvs)[::-1]
            for name in names:
                row = measure(procs[name], ports[name], args.attack, args.seconds)
                pooled[name] += row.pop("times")
                print(round_, name, json.dumps(row), flush=True)
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(10)
    for name, times in pooled.items():
        print("pooled", name, len(times), json.dumps(percentiles(sorted(times))))


if __name__ == "__main__":
    main()
