"""The real process-exporter (Debian's prometheus-process-exporter) and kvm_exporter read the
same process-exporter config file on this host, with processes the test starts: the same
groups, with the same process and thread counts, memory and CPU, under both exporters' names."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import exited_or_listens, free_port, samples, wait_until

PROCESS_EXPORTER = "/usr/bin/prometheus-process-exporter"

# Threads it starts, then a child (a sleep no rule names: -children puts it in its group).
SCRIPT = """
import subprocess, sys, threading, time
threads = int(sys.argv[sys.argv.index("--threads") + 1])
for _ in range(threads - 1):
    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
child = subprocess.Popen(["sleep", "3600"])
print("ready", flush=True)
sys.stdin.read()
child.kill()
"""


def config(token: str) -> str:
    return f"""process_names:
  - name: "{{{{.Comm}}}}"
    comm: [s{token}]
  - name: "py-{{{{.Matches.role}}}}-{{{{.Username}}}}"
    cmdline: ['{token}\\.py --role=(?P<role>\\w+)']
  - name: "{{{{.ExeBase}}}}"
    exe: [{token}-nap, {token}-spin]
"""


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[str]:
    """Processes of groups no other process on the host can fall into; yields the token."""
    token = "k" + secrets.token_hex(4)
    sleeper = tmp_path / f"s{token}"
    sleeper.symlink_to("/bin/sleep")  # comm is the name exec'd: s<token>
    script = tmp_path / f"{token}.py"
    script.write_text(SCRIPT)
    started: list[subprocess.Popen[Any]] = []

    def start(*cmd: str, **kw: Any) -> subprocess.Popen[Any]:
        started.append(subprocess.Popen(list(cmd), **kw))
        return started[-1]

    for _ in range(3):
        start(str(sleeper), "3600")
    # argv[0] is a name of our own (exe matches its basename); comm stays "sleep".
    start("bash", "-c", f"exec -a /opt/{token}-nap sleep 3600")
    start("bash", "-c", f"exec -a /opt/{token}-spin bash -c 'while :; do :; done'")
    for role, threads in (("web", 4), ("web", 2), ("db", 3)):
        p = start(
            sys.executable,
            str(script),
            f"--role={role}",
            "--threads",
            str(threads),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
    yield token
    for p in started:
        p.kill()
        p.wait()


@pytest.fixture
def process_exporter(tmp_path: Path) -> Iterator[Any]:
    """Start the real process-exporter on a free loopback port (never its system service)."""
    running: list[subprocess.Popen[Any]] = []

    def start(config_path: Path) -> str:
        for _attempt in range(5):
            port = free_port()
            log = open(tmp_path / f"pe-{port}.log", "wb")  # noqa: SIM115 - closed with it
            p = subprocess.Popen(
                [
                    PROCESS_EXPORTER,
                    f"-config.path={config_path}",
                    f"-web.listen-address=127.0.0.1:{port}",
                    "-threads=false",
                    "-gather-smaps=false",
                ],
                stdout=log,
                stderr=log,
            )
            running.append(p)
            # It reads every process before it listens: seconds on a busy host.
            wait_until(
                lambda p=p, port=port: exited_or_listens(p, port),
                timeout=120,
                what="process-exporter",
            )
            if p.poll() is None:
                return f"http://127.0.0.1:{port}/metrics"
        raise AssertionError("process-exporter found no free port in 5 attempts")

    yield start
    for p in running:
        p.terminate()
        p.wait(timeout=10)


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url, timeout=120) as response:
        return samples(response.read().decode())


def by_group(
    metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> dict[str, float]:
    out = {}
    for (metric, key), value in metrics.items():
        got = dict(key)
        if metric == name and all(got.get(k) == v for k, v in labels.items()):
            out[got["groupname" if "groupname" in got else "group"]] = value
    return out


def test_same_groups_counts_and_memory_as_the_real_process_exporter(
    exporter: Any, process_exporter: Any, processes: str, tmp_path: Path
) -> None:
    token = processes
    pe_config = tmp_path / "process-exporter.yml"
    pe_config.write_text(config(token))
    ours = exporter(
        f"interval: 0\ncompat: [process_exporter]\ngroups:\n  config_file: {pe_config}\n"
    )
    theirs = process_exporter(pe_config)
    pe = scrape(theirs)
    kvm = ours.metrics()
    user = (
        os.environ.get("USER")
        or subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    )
    expected_procs = {
        f"s{token}"[:15]: 3,  # comm is cut to 15 bytes on Linux
        f"{token}-nap": 1,
        f"{token}-spin": 1,
        f"py-web-{user}": 4,  # two scripts and their sleep children
        f"py-db-{user}": 2,
    }
    pe_procs = by_group(pe, "namedprocess_namegroup_num_procs")
    assert pe_procs == expected_procs  # the fixture is what the test thinks it is
    assert by_group(kvm, "kvm_namegroup_processes") == pe_procs
    assert by_group(kvm, "namedprocess_namegroup_num_procs") == pe_procs
    pe_threads = by_group(pe, "namedprocess_namegroup_num_threads")
    assert pe_threads[f"py-web-{user}"] == 4 + 2 + 2
    assert by_group(kvm, "kvm_namegroup_threads") == pe_threads
    assert by_group(kvm, "namedprocess_namegroup_num_threads") == pe_threads
    # Its states count each process, then each thread of one with two or more again: the
    # scripts of 4 and 2 threads and their 2 children make 4 + 6 sleeping.
    states = "namedprocess_namegroup_states"
    assert by_group(pe, states, state="Sleeping")[f"py-web-{user}"] == 4 + 4 + 2
    for state in ("Running", "Sleeping", "Waiting", "Zombie", "Other"):
        assert by_group(kvm, states, state=state) == by_group(pe, states, state=state), state
    for memtype, ours_name in (
        ("resident", "kvm_namegroup_resident_memory_bytes"),
        ("virtual", "kvm_namegroup_virtual_memory_bytes"),
    ):
        pe_memory = by_group(pe, "namedprocess_namegroup_memory_bytes", memtype=memtype)
        for name, value in (
            (ours_name, by_group(kvm, ours_name)),
            ("compat", by_group(kvm, "namedprocess_namegroup_memory_bytes", memtype=memtype)),
        ):
            assert value.keys() == pe_memory.keys(), name
            for group, theirs_bytes in pe_memory.items():
                assert value[group] == pytest.approx(theirs_bytes, rel=0.02), (name, group)
    pe_oldest = by_group(pe, "namedprocess_namegroup_oldest_start_time_seconds")
    kvm_oldest = by_group(kvm, "kvm_namegroup_oldest_start_time_seconds")
    assert kvm_oldest.keys() == pe_oldest.keys()
    for group, started in pe_oldest.items():
        assert kvm_oldest[group] == pytest.approx(started, abs=1.0)  # PE keeps whole seconds
    # CPU: both exporters' counters of the spinning group, over the same few seconds.
    spin = f"{token}-spin"

    def cpu() -> tuple[float, float]:
        pe_now = by_group(scrape(theirs), "namedprocess_namegroup_cpu_seconds_total", mode="user")
        kvm_now = by_group(ours.metrics(), "kvm_namegroup_cpu_seconds_total", mode="user")
        return pe_now[spin], kvm_now[spin]

    pe_before, kvm_before = cpu()
    time.sleep(4)
    pe_after, kvm_after = cpu()
    assert pe_after - pe_before > 0.5  # it spun
    assert kvm_after - kvm_before == pytest.approx(pe_after - pe_before, rel=0.05)


NAP = "import time; time.sleep(3600)"


def both_on(
    exporter: Any, process_exporter: Any, tmp_path: Path, rules: str, commands: list[list[str]]
) -> tuple[dict[str, float], dict[str, float], str]:
    """Start ``commands``, then both exporters on a process-exporter file of ``rules``: each
    one's processes per group (process-exporter's, ours), and our log."""
    pe_config = tmp_path / "process-exporter.yml"
    pe_config.write_text("process_names:\n" + rules)
    started = [subprocess.Popen(command) for command in commands]
    try:
        ours = exporter(f"interval: 0\ngroups:\n  config_file: {pe_config}\n")
        theirs = by_group(scrape(process_exporter(pe_config)), "namedprocess_namegroup_num_procs")
        return theirs, by_group(ours.metrics(), "kvm_namegroup_processes"), ours.stderr()
    finally:
        for p in started:
            p.kill()
            p.wait()


def test_regexes_mean_what_they_mean_to_the_real_process_exporter(
    exporter: Any, process_exporter: Any, tmp_path: Path
) -> None:
    """Go's RE2 dialect: POSIX classes, ASCII \\d and \\w (Python's re differs on each)."""
    token = "k" + secrets.token_hex(4)
    rules = f"""  - name: "{token}-posix-{{{{.Matches.id}}}}"
    cmdline: ['{token} --id=(?P<id>[[:digit:]]+)']
  - name: "{token}-digits-{{{{.Matches.n}}}}"
    cmdline: ['{token} --n=(?P<n>\\d+)']
  - name: "{token}-word-{{{{.Matches.w}}}}"
    cmdline: ['{token} --w=(?P<w>\\w+)']
"""
    args = ("--id=123", "--id=:]]", "--n=42", "--n=٣٤", "--w=naïve")
    commands = [[sys.executable, "-c", NAP, token, arg] for arg in args]
    theirs, ours, _ = both_on(exporter, process_exporter, tmp_path, rules, commands)
    expected = {f"{token}-posix-123": 1, f"{token}-digits-42": 1, f"{token}-word-na": 1}
    assert {g: n for g, n in theirs.items() if g.startswith(token)} == expected
    assert ours == expected


def test_rules_are_read_as_leniently_as_the_real_process_exporter_reads_them(
    exporter: Any, process_exporter: Any, tmp_path: Path
) -> None:
    """An unknown key beside comm, a comm and a name that YAML reads as a boolean or a number:
    process-exporter takes them as the text written, and so does kvm_exporter."""
    token = "k" + secrets.token_hex(4)
    rules = f"""  - {{name: 123, comm: [yes], cmdline: ['{token}'], cgroup: [/system.slice]}}
  - {{name: 0x1F, comm: [1234], cmdline: ['{token}']}}
"""
    for comm in ("yes", "1234"):  # comm is the name exec'd
        (tmp_path / comm).symlink_to(sys.executable)
    commands = [[str(tmp_path / comm), "-c", f"{NAP}  # {token}"] for comm in ("yes", "1234")]
    theirs, ours, log = both_on(exporter, process_exporter, tmp_path, rules, commands)
    assert {g: theirs.get(g) for g in ("123", "0x1F")} == {"123": 1, "0x1F": 1}
    assert ours == {"123": 1, "0x1F": 1}
    assert "process_names.0.cgroup: unknown key ignored" in log


def test_template_fields_print_as_the_real_process_exporter_prints_them(
    exporter: Any, process_exporter: Any, tmp_path: Path
) -> None:
    """{{.PID}}, {{.StartTime}}, {{.Cgroups}}, {{.Matches}} and a field it does not have."""
    token = "k" + secrets.token_hex(4)
    rules = f"""  - name: "{token}-{{{{.PID}}}}-{{{{.Cgroups}}}}-{{{{.Matches}}}}"
    cmdline: ['{token}-a (?P<k>\\S+)']
  - name: "{token}-{{{{.StartTime}}}}"
    cmdline: ['{token}-b']
  - name: "{token}-c-{{{{.Foo}}}}-d"
    cmdline: ['{token}-c']
"""
    args = ([f"{token}-a", "v1"], [f"{token}-b"], [f"{token}-c"])
    commands = [[sys.executable, "-c", NAP, *a] for a in args]
    theirs, ours, _ = both_on(exporter, process_exporter, tmp_path, rules, commands)
    expected = {g: n for g, n in theirs.items() if g.startswith(token)}
    assert len(expected) == 3 and f"{token}-c-" in expected  # the fixture is as thought
    assert ours == expected
