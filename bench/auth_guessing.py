"""Legitimate scrapes of a basic-auth exporter while clients guess passwords (issue 10, item 4).

Starts the installed exporter on loopback behind a web config with one bcrypt (cost 10) user,
scrapes it once with the right password (so it is remembered, as for any running Prometheus),
then for each number of guessers: that many connections from 127.0.0.1 in a separate process
send wrong passwords back to back (each one new), while this process makes 40 legitimate
scrapes from 127.0.0.2, 50 ms apart, each on a new connection. Prints per number of guessers
the legitimate scrapes answered 200, their p50/p99/max in ms, the guessers' answers by status,
the exporter's CPU and RSS.
Two last rows, ``cold``, restart the exporter and start guessing before the legitimate
scraper's first request (from 127.0.0.2, then from the guessers' own 127.0.0.1): how many of
its 40 scrapes are answered when its password is not yet remembered.

    python bench/auth_guessing.py [--guessers 0 16 64 100] [--scrapes 40]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import bcrypt

PASSWORD = b"correct horse battery staple"
LEGIT = "127.0.0.2"
"""The legitimate scraper's address; the guessers connect from 127.0.0.1."""
CLK_TCK = os.sysconf("SC_CLK_TCK")


def header(user: bytes, password: bytes) -> str:
    return "Basic " + base64.b64encode(user + b":" + password).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Exporter:
    def __init__(self, directory: Path) -> None:
        hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(10)).decode()
        web = directory / "web.yml"
        web.write_text(f"basic_auth_users:\n  prometheus: '{hashed}'\n")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kvm_exporter",
                f"--web.listen-address=127.0.0.1:{self.port}",
                f"--web.config.file={web}",
            ],
            stderr=subprocess.DEVNULL,
            cwd="/",
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                scrape(self.port, b"nobody", b"x")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
        return int(next(x for x in status if x.startswith("VmRSS")).split()[1]) / 1024

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def scrape(port: int, user: bytes, password: bytes, source: str = "127.0.0.1") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", "/metrics", headers={"Authorization": header(user, password)})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


async def guesser(port: int, n: int, until: float, statuses: Counter[str]) -> None:
    i = 0
    while time.monotonic() < until:
        i += 1
        auth = header(b"prometheus", b"guess-%d-%d" % (n, i))
        request = f"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write((request + "Connection: close\r\n\r\n").encode())
            line = await asyncio.wait_for(reader.readline(), 10)
            statuses[line.split(b" ")[1].decode() if line.count(b" ") >= 2 else "closed"] += 1
            writer.close()
        except (OSError, asyncio.TimeoutError):
            statuses["error"] += 1
            await asyncio.sleep(0.01)


def guess(port: int, count: int, seconds: float) -> None:
    """The guessers' process: prints its answers by status as JSON when done."""
    statuses: Counter[str] = Counter()
    until = time.monotonic() + seconds

    async def run() -> None:
        await asyncio.gather(*(guesser(port, n, until, statuses) for n in range(count)))

    asyncio.run(run())
    print(json.dumps(statuses))


def phase(exporter: Exporter, guessers: int, scrapes: int, source: str) -> dict[str, object]:
    seconds = 1.0 + scrapes * 0.2 + 2.0
    spawn = [sys.executable, __file__, "--guess", str(exporter.port), str(guessers), str(seconds)]
    gproc = subprocess.Popen(spawn, stdout=subprocess.PIPE, text=True) if guessers else None
    time.sleep(1.0)  # the guessers ramp up
    cpu0, t0 = exporter.cpu_seconds(), time.monotonic()
    times, answers = [], Counter[str]()
    for _ in range(scrapes):
        began = time.perf_counter()
        try:
            status = scrape(exporter.port, b"prometheus", PASSWORD, source)
        except OSError as err:
            answers[type(err).__name__] += 1
        else:
            answers[str(status)] += 1
            if status == 200:
                times.append((time.perf_counter() - began) * 1000)
        time.sleep(0.05)
    cpu = (exporter.cpu_seconds() - cpu0) / (time.monotonic() - t0)
    rss = exporter.rss_mib()
    guessed = json.loads(gproc.communicate()[0]) if gproc else {}
    ordered = sorted(times) or [float("nan")]
    return {
        "guessers": guessers,
        "legit_from": source,
        "answered_200": answers["200"],
        "scrapes": scrapes,
        "legit_answers": dict(answers),
        "p50_ms": round(statistics.median(ordered), 1),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 1),
        "max_ms": round(ordered[-1], 1),
        "guess_answers": guessed,
        "exporter_cpu_pct": round(cpu * 100),
        "exporter_rss_mib": round(rss, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--guessers", type=int, nargs="+", default=[0, 16, 64, 100])
    parser.add_argument("--scrapes", type=int, default=40)
    parser.add_argument("--guess", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.guess:
        guess(int(args.guess[0]), int(args.guess[1]), float(args.guess[2]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        exporter = Exporter(Path(tmp))
        try:
            assert scrape(exporter.port, b"prometheus", PASSWORD, LEGIT) == 200
            for guessers in args.guessers:
                print(json.dumps(phase(exporter, guessers, args.scrapes, LEGIT)), flush=True)
        finally:
            exporter.stop()
        for source in (LEGIT, "127.0.0.1"):  # elsewhere, then the guessers' own address
            exporter = Exporter(Path(tmp))  # nothing remembered: the first check needs a turn
            try:
                cold = phase(exporter, max(args.guessers), args.scrapes, source)
                print(json.dumps({"cold": True, **cold}), flush=True)
            finally:
                exporter.stop()


if __name__ == "__main__":
    main()
