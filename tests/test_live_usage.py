"""Resources per user on the live /proc: real processes under uids the test owns, a real
exporter, compared with ps and with the kernel's own CPU times."""

from __future__ import annotations

import os
import pwd
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SYSTEM_PYTHON, free_port, listens, samples, wait_until
from fakelib import fixed_passwd

from kvm_exporter.aggregate import MIN_SERIES

MIB = 2**20
USERS = {47101: "usage-a", 47102: "usage-b", 47103: "usage-spin"}
"""Test-owned uids with names from the test's own password table (tests/fakepasswd)."""
HOLD = "import sys, time; b = bytearray(b'x' * int(sys.argv[1])); time.sleep(600)"
SPIN = "while True: pass"
Metrics = dict[tuple[str, frozenset[tuple[str, str]]], float]


def spawn(code: str, uid: int, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([SYSTEM_PYTHON, "-c", code, *args], user=uid, group=uid)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        p.kill()
        p.wait()


def by_user(metrics: Metrics, name: str, **match: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (metric, labels), value in metrics.items():
        lb = dict(labels)
        if metric == name and all(lb.get(k) == v for k, v in match.items()):
            out[lb["user"]] = out.get(lb["user"], 0.0) + value
    return out


def ps_memory() -> dict[int, tuple[int, int]]:
    """(rss, vsz) in bytes per uid, as ps shows them."""
    out = subprocess.run(
        ["ps", "-e", "-o", "uid=,rss=,vsz="], check=True, capture_output=True, text=True
    ).stdout
    sums: dict[int, tuple[int, int]] = {}
    for line in out.splitlines():
        uid, rss, vsz = (int(v) for v in line.split())
        old = sums.get(uid, (0, 0))
        sums[uid] = (old[0] + rss * 1024, old[1] + vsz * 1024)
    return sums


def proc_cpu(pid: int) -> float:
    """utime + stime of ``pid`` in seconds, from the kernel."""
    data = Path(f"/proc/{pid}/stat").read_bytes()
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_memory_per_user_equals_ps(procs: list[subprocess.Popen[bytes]], exporter: Any) -> None:
    for i, uid in enumerate((47101, 47101, 47102)):
        procs.append(spawn(HOLD, uid, str((i + 1) * 8 * MIB)))
    e = exporter("interval: 0\n", env=fixed_passwd(USERS))

    def ours() -> dict[int, tuple[int, int]]:
        return {uid: sums for uid, sums in ps_memory().items() if uid in (47101, 47102)}

    def steady() -> tuple[Metrics, dict[int, tuple[int, int]]] | None:
        before = ours()
        metrics = e.metrics()
        ready = len(before) == 2 and before[47101][0] > 24 * MIB
        return (metrics, before) if ready and before == ours() else None

    metrics, ps = wait_until(steady, timeout=30, what="the test's processes to hold still")
    rss = by_user(metrics, "kvm_resident_memory_bytes")
    vsz = by_user(metrics, "kvm_virtual_memory_bytes")
    counts = by_user(metrics, "kvm_group_processes")
    for uid in (47101, 47102):
        name = USERS[uid]
        assert vsz[name] == ps[uid][1]
        # PID/stat's rss is the kernel's fast per-CPU counter read, ps shows status's exact
        # sum: they differ by at most a counter batch per CPU for each of the three rss
        # counters (file, anon, shmem) of each process.
        slack = counts[name] * 3 * max(32, 2 * os.cpu_count()) * os.cpu_count() * 4096  # type: ignore[operator]
        assert abs(rss[name] - ps[uid][0]) <= slack, (name, rss[name], ps[uid][0])
    assert rss["usage-a"] > 24 * MIB and rss["usage-b"] > 24 * MIB  # what they allocated
    assert (counts["usage-a"], counts["usage-b"]) == (2, 1)
    total = metrics["kvm_memory_total_bytes", frozenset()]
    meminfo = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()
    assert total == int(meminfo[1]) * 1024


def test_cpu_rate_of_a_spinning_process_equals_its_measured_cpu(
    procs: list[subprocess.Popen[bytes]], exporter: Any
) -> None:
    spinner = spawn(SPIN, 47103)
    procs.append(spinner)
    e = exporter("interval: 0\n", env=fixed_passwd(USERS))
    wait_until(lambda: "usage-spin" in by_user(e.metrics(), "kvm_group_processes"))
    before = by_user(e.metrics(), "kvm_cpu_seconds_total")["usage-spin"]
    cpu_before = proc_cpu(spinner.pid)
    time.sleep(3)
    after = by_user(e.metrics(), "kvm_cpu_seconds_total")["usage-spin"]
    used = proc_cpu(spinner.pid) - cpu_before
    assert used > 1.0  # it did spin
    assert abs((after - before) - used) <= 0.05 * used, (after - before, used)


CHURN = """
import os, random, sys, time
uids = [int(u) for u in sys.argv[1].split(",")]
stop, end = sys.argv[2], time.monotonic() + 120
rng = random.Random(7)
kids = []
while time.monotonic() < end and not os.path.exists(stop):
    first, second = rng.choice(uids), rng.choice(uids)
    spin, again, move = rng.uniform(0.1, 0.5), rng.uniform(0.02, 0.3), rng.random() < 0.3
    pid = os.fork()
    if pid == 0:
        os.setresgid(first, first, 0); os.setresuid(first, first, 0)
        stop = time.monotonic() + spin
        while time.monotonic() < stop: pass
        if move:  # change uid mid-life and go on spinning
            os.setresuid(0, 0, 0)  # the saved uid 0 allows it back
            os.setresgid(second, second, second)
            os.setresuid(second, second, second)
            stop = time.monotonic() + again
            while time.monotonic() < stop: pass
        os._exit(0)
    kids.append(pid)
    time.sleep(0.01)
    kids = [k for k in kids if os.waitpid(k, os.WNOHANG) == (0, 0)]
for k in kids: os.waitpid(k, 0)
"""


def test_churn_setuid_and_folding_never_lower_a_counter_nor_spike(
    exporter: Any, tmp_path: Path
) -> None:
    uids = list(range(47111, 47127))  # more users than the cap leaves room for
    e = exporter(f"interval: 0\nmax_series: {MIN_SERIES}\n")
    # The churn goes on until at least 6 s and 5 scrapes have passed (a scrape's poll takes
    # longer on a host with many processes of its own), then stops and reaps its children.
    stop = tmp_path / "stop"
    driver = subprocess.Popen([SYSTEM_PYTHON, "-c", CHURN, ",".join(map(str, uids)), str(stop)])
    try:
        last: Metrics = {}
        last_at = started = time.monotonic()
        folded = 0.0
        scrapes = 0
        while driver.poll() is None and (scrapes < 5 or time.monotonic() - started < 6):
            scrapes += 1
            asked = time.monotonic()  # the poll of this scrape reads after this
            metrics = e.metrics()
            now = time.monotonic()
            grew = 0.0
            for key, value in metrics.items():
                if key[0] in ("kvm_cpu_seconds_total", "kvm_page_faults_total"):
                    assert value >= last.get(key, 0.0), (key, value, last.get(key))
                    if key[0] == "kvm_cpu_seconds_total":
                        grew += value - last.get(key, 0.0)
            # No spike: between the start of the previous scrape and the end of this one the
            # host cannot have used more CPU than it has.
            if last:
                assert grew <= os.cpu_count() * (now - last_at) * 1.1 + 0.05, grew  # type: ignore[operator]
            last.update(metrics)
            last_at = asked
            folded = max(folded, metrics["kvm_resource_folded_groups", frozenset()])
            time.sleep(0.1)
        stop.touch()
        driver.wait(timeout=30)
    finally:
        driver.kill()
        driver.wait()
    assert driver.returncode == 0
    assert scrapes >= 5
    assert folded > 0  # the cap did fold groups into other


def test_cgroup_label_is_the_processes_cgroup(
    procs: list[subprocess.Popen[bytes]], exporter: Any
) -> None:
    procs.append(spawn(HOLD, 47102, str(MIB)))
    e = exporter("interval: 0\nresources: {labels: [user, cgroup]}\n", env=fixed_passwd(USERS))
    lines = Path(f"/proc/{procs[0].pid}/cgroup").read_text().splitlines()
    want = next(line.split(":", 2)[2] for line in lines if line.startswith("0::"))

    def groups() -> dict[str, float]:
        return {
            dict(lb)["cgroup"]: v
            for (n, lb), v in e.metrics().items()
            if n == "kvm_group_processes" and dict(lb)["user"] == "usage-b"
        }

    assert wait_until(groups) == {want: 1}


PE_CONFIG = "process_names:\n  - name: '{{.Username}}'\n    cmdline: ['.*']\n"
"""process-exporter grouping every process by user (as ../shared/bench/pe-user.yml)."""
PE_BINARY = "/usr/bin/prometheus-process-exporter"
"""Debian's prometheus-process-exporter: tests/run.sh must install it."""


def pe_by_user(url: str) -> dict[str, dict[str, float]]:
    """process-exporter's num_procs, resident bytes and CPU seconds per group (user)."""
    out: dict[str, dict[str, float]] = {}
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    for (name, labels), value in samples(text).items():
        lb = dict(labels)
        group = out.setdefault(lb.get("groupname", ""), {"procs": 0.0, "rss": 0.0, "cpu": 0.0})
        if name == "namedprocess_namegroup_num_procs":
            group["procs"] = value
        elif name == "namedprocess_namegroup_memory_bytes" and lb["memtype"] == "resident":
            group["rss"] = value
        elif name == "namedprocess_namegroup_cpu_seconds_total":
            group["cpu"] += value
    return out


def test_side_by_side_with_process_exporter(
    procs: list[subprocess.Popen[bytes]], exporter: Any, tmp_path: Path
) -> None:
    """The real process-exporter and kvm_exporter read the same host: the test's users have
    the same processes, memory within 2% and CPU rate within 5%. Both name users from the
    host's own password database, whatever it holds for these uids."""
    for uid in (47101, 47101, 47102):
        procs.append(spawn(HOLD, uid, str(16 * MIB)))
    procs.append(spawn(SPIN, 47103))
    port = free_port()
    config = tmp_path / "pe-user.yml"
    config.write_text(PE_CONFIG)
    log = (tmp_path / "pe.log").open("wb")
    pe = subprocess.Popen(
        [PE_BINARY, "-config.path", str(config), "-web.listen-address", f"127.0.0.1:{port}"],
        stdout=log,
        stderr=log,
    )
    try:
        pe_url = f"http://127.0.0.1:{port}/metrics"
        wait_until(lambda: listens(pe.pid, port), timeout=60, what="process-exporter")
        e = exporter("interval: 0\n")
        users = {uid: name_of(uid) for uid in (47101, 47102, 47103)}

        def both() -> tuple[dict[str, dict[str, float]], Metrics, dict[str, dict[str, float]]]:
            return pe_by_user(pe_url), e.metrics(), pe_by_user(pe_url)

        def ours(pe: dict[str, dict[str, float]]) -> Any:
            return {u: (pe[u]["procs"], pe[u]["rss"]) for u in users.values() if u in pe}

        def settled() -> Any:
            pe0, kvm, pe1 = both()  # the test's processes held still across kvm's read
            if len(ours(pe0)) == len(users) and ours(pe0) == ours(pe1):
                return pe0, kvm
            return None

        pe_before, kvm_before = wait_until(settled, timeout=30, what="both to see the processes")
        kvm_procs = by_user(kvm_before, "kvm_group_processes")
        kvm_rss = by_user(kvm_before, "kvm_resident_memory_bytes")
        for uid in (47101, 47102):
            name = users[uid]
            assert kvm_procs[name] == pe_before[name]["procs"]
            assert abs(kvm_rss[name] - pe_before[name]["rss"]) <= 0.02 * pe_before[name]["rss"]
        spin = users[47103]
        kvm_cpu0 = by_user(e.metrics(), "kvm_cpu_seconds_total")[spin]
        pe_cpu0 = pe_by_user(pe_url)[spin]["cpu"]
        time.sleep(4)
        kvm_cpu1 = by_user(e.metrics(), "kvm_cpu_seconds_total")[spin]
        pe_cpu1 = pe_by_user(pe_url)[spin]["cpu"]
        pe_used = pe_cpu1 - pe_cpu0
        assert pe_used > 1.0
        assert abs((kvm_cpu1 - kvm_cpu0) - pe_used) <= 0.05 * pe_used
    finally:
        pe.terminate()
        pe.wait(timeout=10)
        log.close()


def name_of(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
