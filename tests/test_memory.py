"""Memory a burst takes is given back after it (issue 23): the resident size of a real
exporter process, before, during and after 1,000 stalled TLS handshakes; what a tracker keeps
of 3,000 processes gone."""

from __future__ import annotations

import gc
import os
import ssl
import time
import tracemalloc

from attack_support import Crowd, client_hello, rss_mib, running, scrape, world_dir
from conftest import listens, wait_until
from test_groups import SPEC, proc
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
