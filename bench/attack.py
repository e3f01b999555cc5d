"""Bounded attacks on kvm_exporter (and node_exporter when installed), each beside a
legitimate scraper, printing per attack: scrape p50/p99/max, failed scrapes, CPU, RSS, fds.
"RSS after" is read after :data:`SETTLE` seconds more of scrapes once the attack is over.

Every attack runs in a child process of its own (``attack.py attacker KIND PORT SECONDS``)
so that neither side's GIL slows the other; the legitimate scraper opens a new connection
for each scrape, 20 a second. ``--attacks`` picks some (each run also measures its target
without attack first). Loopback only; each attack lasts ``--seconds`` (at most 10).

    python bench/attack.py [--seconds 8] [--node-exporter /usr/bin/prometheus-node-exporter]

The process-side attacks (issue 23) run another user's part with processes, not sockets:
``name-flood`` starts 3,000 sleeping processes whose arguments each name a group of their own
(``--app=aN`` under a ``{{.Matches.app}}`` rule) beside the admin's service, a process of
the fixed-name group ``service`` (a name that sorts after the flood's); ``fork-churn`` forks
and reaps processes back to back. There the exporter has both rules and node_exporter its
``processes`` collector on; the ``admin lost`` column counts the scrapes whose answer lacks
the admin's group. ``crafted-cmdline`` starts 3 processes, then one a second, whose
arguments made one Python ``re.search`` of the rule in :data:`CRAFTED_CONFIG` take 7-10 s;
``leader-exit`` runs tests/test_live_leader.py's program, whose first thread exits while
another holds 64 MiB and spins. Against them the exporter polls every second with that
config; the ``note`` column says what the answers showed (the slowest groups poll, and how
the leader-exit process is reported).

Needs the test extra (``pip install '.[test]'``): it reuses tests/attack_support.py.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from attack_support import (  # noqa: E402
    PARTIAL_HEAD,
    Crowd,
    client_hello,
    cpu_seconds,
    drip_head,
    scrape,
)
from conftest import free_port, wait_until  # noqa: E402
from test_live_leader import LEADER_EXITS  # noqa: E402
from tlsutil import write_pki  # noqa: E402

FLOOD_TOKEN = "kvmflood"
"""The first word of the name-flood's processes (and of the rules that name them)."""
FLOOD_PROCESSES = 3000
GROUPS_CONFIG = f"""interval: 1
groups:
  process_names:
    - {{name: 'app-{{{{.Matches.app}}}}', cmdline: ['^{FLOOD_TOKEN} --app=(?P<app>\\S+)']}}
    - {{name: service, cmdline: ['^{FLOOD_TOKEN}-admin ']}}
"""
"""A poll a second, so that polls fall inside the attack (the default 15 s may not)."""
ADMIN_GROUP = b'group="service"'
CRAFTED_CONFIG = r"""interval: 1
groups:
  process_names:
    - {name: 'java-{{.Matches.main}}', cmdline: ['java .*?(?P<main>[\w.]+)$']}
    - {name: 'kvmleader', cmdline: ['--app=kvmleader']}
"""
"""Issue 23 item 1's rule, and one naming the leader-exit program; a poll a second, so that
polls fall inside the attack."""
CRAFTED_ARGV = ["java"] * 260 + ["a" * 2700 + "!"]
"""Arguments that made one Python ``re.search`` of that rule run 7-10 s (issue 23 item 1)."""
SETTLE = 10.0
"""Seconds of scrapes, four a second, after an attack before its "RSS after": several polls
and trims, so that it is what stays, not what the next poll would still give back."""
DRIPPED = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: 0123456789\r\n" * 400 + b"\r\n"


def flood_head() -> bytes:
    """A 15 KiB head of 120 headers: under both servers' caps, costly to parse."""
    return (
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-Flood-%d: %s\r\n" % (i, b"f" * 110) for i in range(120))
        + b"\r\n"
    )


# --- attackers (run in a child process) ---------------------------------------------------------


def _in_threads(clients: int, seconds: float, session: Callable[[float], None]) -> None:
    """Run ``session`` (given the monotonic time to stop at) in ``clients`` threads, over
    and over (after a short pause if it fails) for ``seconds``."""
    stop = time.monotonic() + seconds

    def one() -> None:
        while time.monotonic() < stop:
            try:
                session(stop)
            except OSError:
                time.sleep(0.01)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 10)


def _repeat(port: int, seconds: float, clients: int, request: bytes) -> None:
    """``clients`` keep-alive connections sending ``request`` back to back, each reading the
    answer first (a wrk -c stand-in); a connection that ends is replaced."""

    def session(stop: float) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            while time.monotonic() < stop:
                sock.sendall(request)
                if not _read_response(sock):
                    return

    _in_threads(clients, seconds, session)


def _connect_close(port: int, seconds: float, clients: int) -> None:
    """``clients`` threads connecting and closing at once, sending nothing, as fast as the
    kernel completes the connections."""
    _in_threads(
        clients, seconds, lambda _: socket.create_connection(("127.0.0.1", port), timeout=5).close()
    )


def _read_response(sock: socket.socket) -> bool:
    """Read one response (Content-Length or chunked); False if the connection ended."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return False
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    while (len(body) < int(length[1])) if length else not body.endswith(b"0\r\n\r\n"):
        chunk = sock.recv(65536)
        if not chunk:
            return False
        body += chunk
    return not re.search(rb"(?i)\r\nconnection: *close", head)


def attacker(kind: str, port: int, seconds: float) -> None:
    if kind == "load":
        _repeat(port, seconds, 1000, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    elif kind == "flood":
        _repeat(port, seconds, 64, flood_head())
    elif kind == "connect-close":
        _connect_close(port, seconds, 8)
    elif kind == "drip":
        stopped = threading.Event()
        threads = [
            threading.Thread(target=drip_head, args=(port, DRIPPED, stopped)) for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        stopped.set()
        for thread in threads:
            thread.join(10)
    elif kind == "name-flood":
        sleep = shutil.which("sleep") or "/bin/sleep"
        kids = [
            subprocess.Popen([f"{FLOOD_TOKEN} --app=a{i}", "600"], executable=sleep)
            for i in range(FLOOD_PROCESSES)
        ]
        time.sleep(seconds)
        for kid in kids:
            kid.kill()
            kid.wait()
    elif kind == "crafted-cmdline":
        nap = "import time; time.sleep(600)"
        kids = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:  # 3 at once, then a new one every second
            for _ in range(1 if kids else 3):
                kids.append(
                    subprocess.Popen(
                        ["java", "-c", nap, *CRAFTED_ARGV[1:]], executable=sys.executable
                    )
                )
            time.sleep(1.0)
        for kid in kids:
            kid.kill()
            kid.wait()
    elif kind == "leader-exit":
        with tempfile.TemporaryDirectory() as tmp:
            source, binary = Path(tmp, "leader.c"), Path(tmp, "leader")
            source.write_text(LEADER_EXITS)  # touches 64 MiB in a second thread, which spins
            subprocess.run(["cc", "-O0", "-pthread", "-o", binary, source], check=True)
            kid = subprocess.Popen([binary, "--app=kvmleader"])
            time.sleep(seconds)
            kid.kill()
            kid.wait()
    elif kind == "fork-churn":
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if os.fork() == 0:
                os._exit(0)
            os.wait()
    else:
        crowd = {
            "slowloris": lambda: Crowd(
                port, 1000, opening=PARTIAL_HEAD, drip=b"X-a: b\r\n", every=5
            ),
            "tls-stall": lambda: Crowd(port, 1000, opening=client_hello()),
            "reconnect": lambda: Crowd(port, 1000),
        }[kind]()
        with crowd:
            time.sleep(seconds)


# --- the measuring side -----------------------------------------------------------------------


@dataclass
class Target:
    name: str
    argv: Callable[[int], list[str]]
    tls: bool = False


def rss_fds(pid: int) -> tuple[float, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status)[1]) / 1024  # type: ignore[index]
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


class Running:
    """A target process on a free loopback port, optionally under ``ulimit -n``."""

    def __init__(self, target: Target, max_fds: int | None, log: Path) -> None:
        self.port = free_port()
        self.log = log
        limit = (
            (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (max_fds, max_fds)))
            if max_fds
            else None
        )
        self.proc = subprocess.Popen(
            target.argv(self.port),
            stdout=subprocess.DEVNULL,
            stderr=log.open("wb"),  # noqa: SIM115 - the child keeps it
            preexec_fn=limit,
        )
        self.context = None
        if target.tls:
            self.context = ssl.create_default_context(cafile=str(PKI / "ca.pem"))
            self.context.check_hostname = False
        wait_until(
            lambda: scrape(self.port, context=self.context, timeout=2)[0] == 200, 30, target.name
        )
        time.sleep(1.5)  # the first poll, and a settled RSS

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def measure(
    running: Running, kind: str | None, seconds: float, expect: bytes | None = None
) -> dict[str, object]:
    """One attack's row; ``expect``: what every scrape's answer must hold (else counted in
    ``admin lost``); the attack's :data:`NOTES` entry, if any, says what the answers showed."""
    pid = running.proc.pid
    log_before = running.log.stat().st_size
    attack = None
    if kind:
        attack = subprocess.Popen(
            [sys.executable, __file__, "attacker", kind, str(running.port), str(seconds)]
        )
        time.sleep(1.0)  # let it build up
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    times: list[float] = []
    failed = lost = 0
    bodies: list[bytes] = []
    peak_rss, peak_fds = rss_fds(pid)
    while time.monotonic() - t0 < seconds - 1.0:
        try:
            status, body, took = scrape(running.port, context=running.context, timeout=10)
            if status == 200:
                times.append(took * 1000)
                if kind in NOTES:
                    bodies.append(body)
                lost += expect is not None and expect not in body
            else:
                failed += 1
        except (OSError, Exception):
            failed += 1
        rss, fds = rss_fds(pid)
        peak_rss, peak_fds = max(peak_rss, rss), max(peak_fds, fds)
        time.sleep(0.05)
    cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
    if attack is not None:
        attack.wait(30)
    deadline = time.monotonic() + SETTLE
    while time.monotonic() < deadline and running.proc.poll() is None:
        with contextlib.suppress(OSError):
            scrape(running.port, context=running.context, timeout=5)
        time.sleep(0.25)
    alive = running.proc.poll() is None
    after = rss_fds(pid)[0] if alive else float("nan")
    try:
        recovered = scrape(running.port, context=running.context, timeout=5)[0] == 200
    except OSError:
        recovered = False
    text = running.log.read_bytes()[log_before:].decode(errors="replace")
    times.sort()
    return {
        "attack": kind or "none",
        "ok": len(times),
        "failed": failed,
        "lost": lost if expect is not None else None,
        "p50": statistics.median(times) if times else float("nan"),
        "p99": times[min(len(times) - 1, int(len(times) * 0.99))] if times else float("nan"),
        "max": times[-1] if times else float("nan"),
        "cpu": cpu * 100,
        "rss": peak_rss,
        "rss_after": after,
        "fds": peak_fds,
        "log_lines": text.count("\n"),
        "tracebacks": text.count("Traceback"),
        "alive": alive and recovered,
        "note": NOTES[kind](bodies) if kind in NOTES and bodies else "",
    }


def _values(bodies: list[bytes], series: bytes) -> list[float]:
    """The values of the sample ``series`` (name and labels as exposed) in ``bodies``."""
    pattern = re.compile(rb"(?m)^" + re.escape(series) + rb" (\S+)")
    return [float(m[1]) for body in bodies for m in pattern.finditer(body)]


def _crafted_note(bodies: list[bytes]) -> str:
    polls = _values(bodies, b'kvm_poll_duration_seconds{collector="groups"}')
    up = _values(bodies, b"kvm_up")
    if not polls:
        return ""  # node_exporter reads no command lines
    return f"groups poll max {max(polls) * 1000:.0f} ms, kvm_up min {min(up):.0f}"


def _leader_note(bodies: list[bytes]) -> str:
    last = bodies[-1:]
    running = _values(last, b'kvm_namegroup_state_processes{group="kvmleader",state="running"}')
    rss = _values(last, b'kvm_namegroup_resident_memory_bytes{group="kvmleader"}')
    if running or rss:
        return f"kvmleader: {sum(running):.0f} running, RSS {sum(rss) / 2**20:.0f} MiB"
    zombies = _values(last, b'node_processes_state{state="Z"}')
    return f"zombies counted: {sum(zombies):.0f}" if zombies else ""


NOTES: dict[str | None, Callable[[list[bytes]], str]] = {
    "crafted-cmdline": _crafted_note,
    "leader-exit": _leader_note,
}
"""What the answers during an attack showed, for the attacks that have something to show."""


PKI = Path(tempfile.mkdtemp(prefix="kvm-attack-pki-"))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "attacker":
        attacker(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--node-exporter", default=shutil.which("prometheus-node-exporter"))
    parser.add_argument(
        "--only", choices=["network", "processes"], help="run only these attacks (default: all)"
    )
    parser.add_argument(
        "--attacks",
        type=lambda text: set(text.split(",")),
        help="comma-separated attacks to run (each with its target's no-attack row)",
    )
    args = parser.parse_args()
    seconds = min(args.seconds, 10.0)
    write_pki(PKI)
    web = PKI / "web.yml"
    web.write_text(
        f"tls_server_config:\n  cert_file: {PKI}/server.pem\n  key_file: {PKI}/server-key.pem\n"
    )
    groups = PKI / "groups.yml"
    groups.write_text(GROUPS_CONFIG)
    crafted = PKI / "crafted.yml"
    crafted.write_text(CRAFTED_CONFIG)
    kvm = [sys.executable, "-m", "kvm_exporter"]
    # Per target: its command, what the name and crafted-process attacks add to it.
    targets = [
        (
            "kvm_exporter",
            kvm,
            [f"--config.file={groups}"],
            ADMIN_GROUP,
            [f"--config.file={crafted}"],
        )
    ]
    if args.node_exporter:
        processes = ["--collector.processes"]
        targets.append(
            (
                "node_exporter",
                [args.node_exporter, "--collector.disable-defaults", "--collector.loadavg"],
                processes,
                None,
                processes,
            )
        )
    sleep = shutil.which("sleep") or "/bin/sleep"
    admin = subprocess.Popen([f"{FLOOD_TOKEN}-admin", "3600"], executable=sleep)
    try:
        rows = run_all(targets, web, seconds, args.only, args.attacks)
    finally:
        admin.kill()
        admin.wait()
    print()
    print(HEADER)
    for row in rows:
        print(format_row(row))


def run_all(
    targets: list[tuple[str, list[str], list[str], bytes | None, list[str]]],
    web: Path,
    seconds: float,
    only: str | None,
    attacks: set[str] | None = None,
) -> list[dict[str, object]]:
    """Every attack of ``only`` (None: all) and of ``attacks`` (None: all) against every
    target, a row each."""
    rows: list[dict[str, object]] = []
    for name, argv, with_processes, expect, with_crafted in targets:
        plain = Target(name, lambda port, a=argv: [*a, f"--web.listen-address=127.0.0.1:{port}"])
        tls = Target(
            name,
            lambda port, a=argv: [
                *a,
                f"--web.listen-address=127.0.0.1:{port}",
                f"--web.config.file={web}",
            ],
            tls=True,
        )
        processes, crafted = (
            Target(
                f"{name} {extra[0].split('=')[0]}{label}",
                lambda port, a=[*argv, *extra]: [*a, f"--web.listen-address=127.0.0.1:{port}"],
            )
            for extra, label in ((with_processes, ""), (with_crafted, " (crafted rules)"))
        )
        runs: list[tuple[Target, int | None, list[str | None], bytes | None]] = []
        if only in (None, "network"):
            runs += [
                (plain, None, [None, "slowloris", "load", "drip", "flood", "connect-close"], None),
                (tls, None, [None, "tls-stall"], None),
                (plain, 256, [None, "reconnect"], None),
            ]
        if only in (None, "processes"):
            runs.append((processes, None, [None, "name-flood", "fork-churn"], expect))
            runs.append((crafted, None, [None, "crafted-cmdline", "leader-exit"], None))
        if attacks is not None:
            runs = [
                (target, max_fds, [None, *(k for k in kinds if k in attacks)], expected)
                for target, max_fds, kinds, expected in runs
                if attacks.intersection(kinds)
            ]
        with tempfile.TemporaryDirectory() as tmp:
            for target, max_fds, kinds, expected in runs:
                running = Running(target, max_fds, Path(tmp) / f"{name}-{len(rows)}.log")
                try:
                    for kind in kinds:
                        row = measure(running, kind, seconds, expected)
                        row["target"] = (
                            target.name
                            + (" TLS" if target.tls else "")
                            + (f" ulimit -n {max_fds}" if max_fds else "")
                        )
                        rows.append(row)
                        print(format_row(row), flush=True)
                finally:
                    running.stop()
    return rows


HEADER = (
    "| target | attack | scrapes ok/failed | admin lost | p50 ms | p99 ms | max ms | CPU % | "
    "RSS peak MiB | RSS after MiB | fds peak | log lines | alive | note |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
)


def format_row(row: dict[str, object]) -> str:
    return (
        f"| {row['target']} | {row['attack']} | {row['ok']}/{row['failed']} | "
        f"{'' if row['lost'] is None else row['lost']} | {row['p50']:.1f} | "
        f"{row['p99']:.1f} | {row['max']:.1f} | {row['cpu']:.0f} | {row['rss']:.1f} | "
        f"{row['rss_after']:.1f} | {row['fds']} | {row['log_lines']} | "
        f"{'yes' if row['alive'] and not row['tracebacks'] else 'NO'} | {row['note']} |"
    )


if __name__ == "__main__":
    main()
