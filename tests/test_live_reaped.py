"""Short-lived processes on the live /proc: what their reaper collects is counted, the host's
own counters sit beside the groups', and a user's series outlive its last process. Real
processes under uids the test owns, a real exporter; the truth is the kernel's getrusage."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from conftest import SYSTEM_PYTHON, wait_until
from fakelib import fixed_passwd
from test_live_usage import by_user

USERS = {47111: "reap-make", 47112: "reap-gone"}
"""Test-owned uids, named by the test's own password table."""

WORKLOAD = r"""
import os, resource, sys, time
seconds, burn = float(sys.argv[1]), float(sys.argv[2])
sys.stdin.readline()
def used():
    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
start, until, children = used(), time.monotonic() + seconds, 0
while time.monotonic() < until:
    pid = os.fork()
    if pid == 0:
        end = time.process_time() + burn
        while time.process_time() < end:
            pass
        os._exit(0)
    os.waitpid(pid, 0)
    children += 1
print(used() - start, children, flush=True)
time.sleep(600)
"""
"""Waits for a line on stdin, then forks children that each burn ``burn`` s of CPU and reaps
them for ``seconds`` s; prints the CPU it and its children used meanwhile (getrusage) and how
many it forked, and stays (the reaper lives on, as make's parent shell would)."""


def cpu_of(e: Any, user: str) -> float:
    return by_user(e.metrics(), "kvm_cpu_seconds_total").get(user, 0.0)


def test_children_shorter_than_the_interval_are_counted_once(exporter: Any) -> None:
    """Children of 0.05 s under a 2 s interval: no poll sees most of them. Old code counted
    what polls saw of them (a few %); now all of it, and never more (the kernel's truth)."""
    make = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", WORKLOAD, "6", "0.05"],
        user=47111,
        group=47111,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert make.stdin is not None and make.stdout is not None
    try:
        e = exporter("interval: 2\n", env=fixed_passwd(USERS))
        wait_until(lambda: "reap-make" in by_user(e.metrics(), "kvm_group_processes"))
        after_poll(e)  # make's baseline is taken
        before = cpu_of(e, "reap-make")
        make.stdin.write(b"go\n")
        make.stdin.flush()
        used, children = (float(v) for v in make.stdout.readline().split())
        after_poll(e, 2)
        counted = cpu_of(e, "reap-make") - before
    finally:
        make.kill()
        make.wait()
    assert children > 20 and used > 1.0  # fewer on a loaded machine: the truth is measured
    assert 0.95 * used <= counted <= 1.01 * used + 0.05, (counted, used)


def after_poll(e: Any, polls: int = 1) -> None:
    """Wait until the exporter has polled ``polls`` more times."""
    now = e.metrics()[("kvm_polls_total", frozenset())]
    wait_until(lambda: e.metrics()[("kvm_polls_total", frozenset())] >= now + polls, 10, "polls")


def test_the_host_counters_are_the_kernels(exporter: Any) -> None:
    """kvm_host_cpu_seconds_total and kvm_forks_total lie between two reads of /proc/stat
    made around a scrape (both counters only grow)."""

    def read() -> tuple[dict[str, float], int]:
        text = Path("/proc/stat").read_text()
        lines = {line.split()[0]: line.split()[1:] for line in text.splitlines()}
        ticks = os.sysconf("SC_CLK_TCK")
        modes = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
        cpu = dict(zip(modes, (int(v) / ticks for v in lines["cpu"]), strict=False))
        return cpu, int(lines["processes"][0])

    e = exporter("interval: 0\n")
    cpu_before, forks_before = read()
    metrics = e.metrics()
    cpu_after, forks_after = read()
    assert forks_before <= metrics[("kvm_forks_total", frozenset())] <= forks_after
    for mode, seconds in cpu_before.items():
        got = metrics[("kvm_host_cpu_seconds_total", frozenset({("mode", mode)}))]
        assert seconds <= got <= cpu_after[mode], mode
    faults = {("type", "minor"), ("type", "major")}
    assert all(("kvm_host_page_faults_total", frozenset({f})) in metrics for f in faults)


def test_a_users_series_outlive_its_last_process(exporter: Any) -> None:
    """The user's last process exits: its series stay, processes at 0, counters at their
    totals (its last increments within reach of increase()), and processes started counts."""
    e = exporter("interval: 0\n", env=fixed_passwd(USERS))
    e.metrics()  # the first poll: a baseline
    holder = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", REAP_ONE], user=47112, group=47112, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"reaped\n"
        wait_until(lambda: cpu_of(e, "reap-gone") >= 0.29, what="the reaped child's CPU")
        before = by_user(e.metrics(), "kvm_cpu_seconds_total")["reap-gone"]
    finally:
        holder.kill()
        holder.wait()
    metrics = e.metrics()
    assert by_user(metrics, "kvm_group_processes")["reap-gone"] == 0
    assert by_user(metrics, "kvm_cpu_seconds_total")["reap-gone"] == before
    assert by_user(metrics, "kvm_processes_started_total")["reap-gone"] >= 1


REAP_ONE = """
import os, sys, time
pid = os.fork()
if pid == 0:
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    os._exit(0)
os.waitpid(pid, 0)
print("reaped", flush=True)
time.sleep(600)
"""
"""Forks a child that burns 0.3 s of CPU, reaps it, says so and stays."""
