"""Memory a burst takes is given back after it (issue 23): the resident size of a real
exporter process, before, during and after 1,000 stalled TLS handshakes."""

from __future__ import annotations

import ssl
import time

from attack_support import Crowd, client_hello, rss_mib, running, scrape, world_dir
from conftest import listens, wait_until
from tlsutil import write_pki

from kvm_exporter import memory


def test_rss_returns_near_its_baseline_after_a_thousand_stalled_handshakes() -> None:
    """Each stalled handshake holds OpenSSL's buffers (about 40 KiB); once the clients are
    gone, the exporter's resident size is back within 5 MiB of where it was."""
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
            with Crowd(daemon.port, 1000, opening=client_hello()):
                peak = wait_until(
                    lambda: (r := rss_mib(pid)) > baseline + 20 and r,
                    timeout=30,
                    what="the handshakes' buffers",
                )
            print(f"\nRSS MiB: baseline {baseline:.1f}, during {peak:.1f}")
            wait_until(lambda: rss_mib(pid) <= baseline + 5, timeout=10, what="memory back")
            assert scrape(daemon.port, context=context)[0] == 200


def test_giving_back_runs_at_most_once_a_second() -> None:
    """A trim costs about half a millisecond: a scrape loop (``interval: 0``) must not pay it
    on every poll."""
    assert memory.give_back() is True  # glibc: trimmable
    assert memory.give_back() is False
    time.sleep(memory.MIN_GAP)
    assert memory.give_back() is True
