"""How much of short-lived processes' CPU the per-user counter sees, against the kernel's truth.

A workload parent under a uid of its own forks children that each burn a fixed amount of CPU
and exit, and reaps them; its getrusage(RUSAGE_SELF + RUSAGE_CHILDREN) over the run is the
truth. A real exporter (``python -m kvm_exporter`` of the interpreter running this) polls at
the given interval and is scraped every 0.5 s, as Prometheus would; the counted share is the
growth of ``kvm_cpu_seconds_total{user=UID}`` from a poll before the work to a poll after it.

Then a whole host under a mixed load (``make -j2`` of a generated C project, a cron-like loop
of short shell commands, a long-lived spinner): the growth of every group's counters against
the host's own busy time (``kvm_host_cpu_seconds_total`` user + nice + system) over the run.

Run as root (it runs the workload as another uid): ``python bench/shortlived.py``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import Exporter  # noqa: E402 (the tests' exporter process, one copy)
from test_live_reaped import WORKLOAD  # noqa: E402 (the tests' own workload, one copy)

UID = 47199
"""The workload's uid: no account needed, its series is labelled with the number."""


Metrics = dict[tuple[str, frozenset[tuple[str, str]]], float]


def total(metrics: Metrics, name: str, **match: str) -> float:
    return sum(
        v
        for (n, labels), v in metrics.items()
        if n == name and all(dict(labels).get(k) == w for k, w in match.items())
    )


@contextmanager
def exporter(interval: float) -> Iterator[Exporter]:
    """The tests' real exporter process on a free loopback port."""
    with tempfile.TemporaryDirectory() as tmp:
        running = Exporter(Path(tmp), f"interval: {interval}\n", ["--log.level=error"], {})
        try:
            yield running
        finally:
            running.stop()


def after_polls(e: Exporter, polls: int) -> None:
    """Scrape every 0.5 s until the exporter has polled ``polls`` more times."""
    start = total(e.metrics(), "kvm_polls_total")
    while total(e.metrics(), "kvm_polls_total") < start + polls:
        time.sleep(0.5)


def short_lived(seconds: float, burn: float, interval: float) -> tuple[float, float, int]:
    """(CPU used, CPU counted, children) of one workload run."""
    with exporter(interval) as e:
        work = subprocess.Popen(
            [sys.executable, "-c", WORKLOAD, str(seconds), str(burn)],
            user=UID,
            group=UID,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert work.stdin is not None and work.stdout is not None
        try:
            after_polls(e, 2)  # the workload's parent is a baseline
            before = total(e.metrics(), "kvm_cpu_seconds_total", user=str(UID))
            work.stdin.write(b"go\n")
            work.stdin.flush()
            used, children = work.stdout.readline().split()
            after_polls(e, 1)
            counted = total(e.metrics(), "kvm_cpu_seconds_total", user=str(UID)) - before
        finally:
            work.kill()
            work.wait()
    return float(used), counted, int(children)


def mixed_host(seconds: float) -> tuple[float, float]:
    """(host busy CPU, CPU all groups counted) over ``seconds`` of a mixed load."""
    project = Path(tempfile.mkdtemp())
    for i in range(60):
        body = "".join(
            f"double f{i}_{j}(double x) {{ return x * {j} + {i}; }}\n" for j in range(400)
        )
        (project / f"unit{i}.c").write_text(body)
    (project / "Makefile").write_text(
        "OBJS = " + " ".join(f"unit{i}.o" for i in range(60)) + "\n"
        "all: $(OBJS)\n%.o: %.c\n\tcc -O2 -c $< -o $@\nclean:\n\trm -f *.o\n"
    )
    busy = ("user", "nice", "system")
    with exporter(15) as e:
        after_polls(e, 1)
        first = e.metrics()
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        cron = subprocess.Popen(
            ["sh", "-c", "while :; do sh -c 'ls /proc >/dev/null'; sleep 0.05; done"]
        )
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            subprocess.run(["make", "-s", "-C", str(project), "clean"], check=True)
            subprocess.run(["make", "-s", "-j2", "-C", str(project)], check=True)
        spinner.kill()
        cron.kill()
        spinner.wait()
        cron.wait()
        after_polls(e, 1)
        last = e.metrics()
    shutil.rmtree(project)
    host = sum(
        total(last, "kvm_host_cpu_seconds_total", mode=m)
        - total(first, "kvm_host_cpu_seconds_total", mode=m)
        for m in busy
    )
    groups = total(last, "kvm_cpu_seconds_total") - total(first, "kvm_cpu_seconds_total")
    return host, groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixed-seconds", type=float, default=60)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the workload runs as another uid")
    print("| child lives | interval | CPU used | counted for its user | share | children |")
    print("|---|---|---|---|---|---|")
    for seconds, burn, interval in ((30, 0.2, 15), (40, 5, 15), (30, 0.2, 1)):
        used, counted, children = short_lived(seconds, burn, interval)
        share = 100 * counted / used
        print(
            f"| {burn} s | {interval} s | {used:.2f} s | {counted:.2f} s | {share:.1f}%"
            f" | {children} |"
        )
    host, groups = mixed_host(args.mixed_seconds)
    share = 100 * groups / host
    print(
        f"\nmixed host, {args.mixed_seconds:.0f} s: host busy {host:.2f} s, groups {groups:.2f} s"
    )
    print(f"share accounted: {share:.1f}%")


if __name__ == "__main__":
    main()
