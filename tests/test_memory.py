"""Memory a burst takes is given back after it (issue 23): the resident size of a real
exporter process, before, during and after 1,000 stalled TLS handshakes and 3,000 processes
naming a group each; what a tracker keeps of 3,000 processes gone."""

from __future__ import annotations

import gc
import os
import secrets
import ssl
import subprocess
import time
import tracemalloc

from attack_support import (
    Crowd,
    client_hello,
    rss_mib,
    running,
    scrape,
    world_dir,
    write_config,
)
from conftest import SYSTEM_PYTHON, listens, wait_until
from test_groups import SPEC, group_processes, proc
from tlsutil import write_pki

from kvm_exporter import memory
from kvm_exporter.usage import Attribution, Tracker


def test_a_thousand_stalled_handshakes_take_bounded_memory_and_give_it_back() -> None:
    """Each stalled handshake holds OpenSSL's buffers (about 43 KiB): 1,000 clients that stall
    after their ClientHello grow the resident size by at most 20 MiB (256 handshakes in
    flight, the oldest dropped for newer ones; before, all 1,000 held 45 MiB), a real scrape
    is answered meanwhile, and once the clients are gone the size is back within 5 MiB of
    where it was."""
    with world_dir() as pki:
        write_pki(pki)
        web = pki / "web.yml"
        web.write_text(
            f"tls_server_config:\n  cert_file: {pki}/server.pem\n  key_file: {pki}/server-key.pem\n"
        )
        context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        context.check_hostname = False
        with running(None, f"--web.config.file={web}", wait=False) as daemon:
            pid = daemon.proc.pid
            wait_until(lambda: listens(pid, daemon.port), timeout=30, what="listening")
            for _ in range(3):  # the first poll, the exposition cache, a settled size
                assert scrape(daemon.port, context=context)[0] == 200
            baseline = rss_mib(pid)
            sizes = [baseline]
            with Crowd(daemon.port, 1000, opening=client_hello()):
                wait_until(
                    lambda: sizes.append(rss_mib(pid)) or len(os.listdir(f"/proc/{pid}/fd")) > 1000,
                    timeout=60,
                    what="1,000 connections",
                )
                # A scrape goes through the loop after it has begun every handshake.
                assert scrape(daemon.port, context=context)[0] == 200
                sizes.append(rss_mib(pid))
            print(f"\nRSS MiB: baseline {baseline:.1f}, peak during {max(sizes):.1f}")
            assert max(sizes) <= baseline + 20
            wait_until(lambda: rss_mib(pid) <= baseline + 5, timeout=10, what="memory back")
            assert scrape(daemon.port, context=context)[0] == 200


FLOOD = """\
import shutil, subprocess, sys
sleep = shutil.which("sleep") or "/bin/sleep"
token = sys.argv[1]
kids = [subprocess.Popen([f"{token} --app=a{i}", "600"], executable=sleep) for i in range(3000)]
sys.stdin.read()
for kid in kids:
    kid.kill()
for kid in kids:
    kid.wait()
"""
"""3,000 sleeping processes naming a group each, until standard input closes."""


def test_three_thousand_processes_naming_a_group_each_give_their_memory_back(
    namespace: str,
) -> None:
    """Each process names a group of its own (``--app=aN`` under a ``{{.Matches.app}}``
    rule), scraped four times a second as a dashboard would: the resident size peaks under
    64 MiB and is back within 5 MiB of where it was once they are gone (20 s later, the
    least of 5 s of readings: a poll's own blocks, up to a MiB, come and go each second, and
    pages the burst left part used can take that long to empty). Under Python's own
    allocator, whose arenas the burst's survivors and later scrapes keep, 7.5-8 MiB stayed.
    The exporter and the processes are in a PID namespace of the test's own: what else the
    host runs does not change what it holds."""
    token = "m" + secrets.token_hex(3)
    rule = f"{{name: 'app-{{{{.Matches.app}}}}', cmdline: ['^{token} --app=(?P<app>\\S+)']}}"
    procfs = f"--path.procfs=/proc/{namespace}/root/proc"
    inside = ["nsenter", "-t", namespace, "-p", "-m", SYSTEM_PYTHON, "-c", FLOOD, token]
    with world_dir() as directory:
        config = write_config(directory, f"interval: 1\ngroups:\n  process_names: [{rule}]\n")
        with running(config, procfs) as daemon:
            pid = daemon.proc.pid
            for _ in range(10):  # the first polls, the exposition cache, a settled size
                daemon.get()
                time.sleep(0.5)
            baseline = rss_mib(pid)
            sizes = [baseline]

            def named() -> float:
                sizes.append(rss_mib(pid))
                processes = sum(group_processes(daemon.metrics()).values())  # folded or not
                time.sleep(0.25)
                return processes

            with subprocess.Popen(inside, stdin=subprocess.PIPE) as flood:
                assert flood.stdin is not None
                wait_until(lambda: named() >= 3000, timeout=60, what="3,000 processes named")
                for _ in range(8):  # two more polls at the burst's size
                    named()
                flood.stdin.close()
            wait_until(lambda: named() == 0, timeout=30, what="the processes gone")
            readings = []
            for _ in range(100):  # 25 s more of polls and scrapes: what stays, not a dip
                daemon.get()
                time.sleep(0.25)
                readings.append(rss_mib(pid))
            after = min(readings[-20:])  # between polls: each poll's own blocks come and go
            print(f"\nRSS MiB: baseline {baseline:.1f}, peak {max(sizes):.1f}, after {after:.1f}")
            assert after <= baseline + 5
            assert max(sizes) <= 64


def environment(pid: int) -> dict[str, str]:
    """The environment process ``pid`` runs with (of its last ``execve``)."""
    with open(f"/proc/{pid}/environ", "rb") as file:
        entries = file.read().decode().split("\0")
    return dict(entry.partition("=")[::2] for entry in entries if entry)


def test_the_service_runs_on_the_c_allocator_unless_its_administrator_chose() -> None:
    """The exporter starts again as the same process (the one listening is the one started)
    with ``PYTHONMALLOC=malloc`` and glibc's per-thread cache off; a ``PYTHONMALLOC`` it was
    given stays, and nothing is added then."""
    # None given (glibc cuts /proc's copy of a list of them at the first ":")
    with running(None, env={"GLIBC_TUNABLES": ""}) as daemon:
        env = environment(daemon.proc.pid)
        assert env["PYTHONMALLOC"] == memory.ALLOCATOR == "malloc"
        assert env["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=0"
    with running(None, env={"PYTHONMALLOC": "pymalloc", "GLIBC_TUNABLES": ""}) as daemon:
        env = environment(daemon.proc.pid)
        assert env["PYTHONMALLOC"] == "pymalloc"
        assert env["GLIBC_TUNABLES"] == ""


def test_the_tunables_an_administrator_gave_stay() -> None:
    given = {"GLIBC_TUNABLES": "glibc.malloc.perturb=0", "HOME": "/"}
    env = memory.service_environment(given, glibc=True)
    assert env == {
        "GLIBC_TUNABLES": "glibc.malloc.perturb=0:glibc.malloc.tcache_count=0",
        "HOME": "/",
        "PYTHONMALLOC": "malloc",
    }
    assert memory.service_environment({"HOME": "/"}, glibc=False) == {
        "HOME": "/",
        "PYTHONMALLOC": "malloc",
    }
    assert memory.service_environment({**given, "PYTHONMALLOC": "malloc"}, glibc=True) is None


def test_giving_back_runs_at_most_once_a_second() -> None:
    """A trim costs about half a millisecond: a scrape loop (``interval: 0``) must not pay it
    on every poll."""
    assert memory.give_back() is True  # glibc: trimmable
    assert memory.give_back() is False
    time.sleep(memory.MIN_GAP)
    assert memory.give_back() is True


def test_a_tracker_keeps_next_to_nothing_of_a_burst_of_processes_gone() -> None:
    """3,000 processes of a kind each (a group name of their own) come and go: what the
    tracker still holds is its dicts' grown tables, under 100 bytes a process (it kept each
    process's kind, 300 bytes, until as many new kinds came)."""
    names = Attribution(lambda _, name: name, lambda new, _: {pid: f"group-{pid}" for pid in new})
    tracker = Tracker(names, SPEC)
    steady = [proc(1, 0, "init")]

    def burst(first_pid: int, clock: int) -> None:
        tracker.update(steady + [proc(first_pid + i, 1, "x") for i in range(3000)], clock)
        tracker.update(steady, clock + 1)

    burst(10, 0)  # the tracker's dicts grow to their size once
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    burst(10_000, 2)
    gc.collect()
    kept = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert kept < 3000 * 100, kept


def test_a_tracker_gives_back_the_room_of_a_burst_once_it_is_gone() -> None:
    """Its tables keyed by process and by group are rebuilt once most processes are gone: a
    dict keeps the room of its largest size until then (144-576 KiB each after 3,000)."""
    names = Attribution(lambda _, name: name, lambda new, _: {pid: f"group-{pid}" for pid in new})
    tracker = Tracker(names, SPEC, oldest=True)
    steady = [proc(1, 0, "init")]
    tracker.update(steady, 0)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tracker.update(steady + [proc(10 + i, 1, "x") for i in range(3000)], 1)
    tracker.update(steady, 2)
    gc.collect()
    kept = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert kept < 3000 * 20, kept  # 356 KB before (the room of 3,000 in 4 dicts)
