"""Attacks on the HTTP server of a real exporter process (issue 10): each bounded to seconds,
on loopback, with a legitimate scraper beside it."""

from __future__ import annotations

import contextlib
import http.client
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from attack_support import (
    PARTIAL_HEAD,
    Crowd,
    Daemon,
    cpu_seconds,
    drip_head,
    error_lines,
    import_path,
    raw_exchange,
    running,
    scrape,
    scrape_until,
    value,
    write_config,
)
from conftest import free_port, samples, wait_until

from kvm_exporter.logs import EXIT_CRASH


def scrape_up(daemon: Daemon) -> float:
    """A legitimate scrape on a new connection: 200 with ``kvm_up`` 1; returns its seconds."""
    status, body, seconds = scrape(daemon.port, timeout=15)
    assert status == 200
    assert value(samples(body.decode()), "kvm_up") == 1
    return seconds


@contextlib.contextmanager
def exporter(config: Path | None = None, *args: str, **kw: Any) -> Iterator[Daemon]:
    """A running exporter that has finished its first poll."""
    with running(config, *args, **kw) as daemon:
        scrape_until(daemon, lambda m: value(m, "kvm_up") == 1, "the first poll")
        yield daemon


def log_lines(daemon: Daemon) -> list[str]:
    return daemon.stderr().splitlines()


def assert_clean_log(daemon: Daemon) -> None:
    """Every line is a logfmt line and none is an error: no traceback on stderr."""
    lines = log_lines(daemon)
    assert all(line.startswith("ts=") for line in lines), lines
    assert error_lines("\n".join(lines)) == []


# --- finding 1: the event loop died dropping a connection with an event pending -------------


def test_closing_the_oldest_with_its_bytes_pending_keeps_the_listener_alive() -> None:
    """The oldest connection is closed to make room while its next bytes wait in the same
    batch of events: the exporter is stopped (SIGSTOP) while a new client connects and then
    the oldest ones send more of their heads, so that on SIGCONT the loop gets them in that
    order. 320 descriptors less the 64 kept for polls allow 256 connections."""
    with exporter(max_fds=320) as daemon:
        slow = [socket.create_connection(("127.0.0.1", daemon.port)) for _ in range(256)]
        try:
            for sock in slow:
                sock.sendall(PARTIAL_HEAD)
            time.sleep(0.5)
            for _ in range(3):
                daemon.signal(signal.SIGSTOP)
                extra = [socket.create_connection(("127.0.0.1", daemon.port)) for _ in range(8)]
                for sock in slow:
                    with contextlib.suppress(OSError):
                        sock.send(b"X-Slow: 1\r\n")
                daemon.signal(signal.SIGCONT)
                time.sleep(0.3)
                slow = slow[8:] + extra
            scrape_up(daemon)
            with Crowd(daemon.port, 300, opening=PARTIAL_HEAD, drip=b"X: 1\r\n", every=0.02):
                for _ in range(5):
                    scrape_up(daemon)
        finally:
            for sock in slow:
                sock.close()
        assert daemon.proc.poll() is None
        assert_clean_log(daemon)


# --- finding 2: at the file descriptor limit ---------------------------------------------------


def test_at_the_fd_limit_it_backs_off_keeps_polling_and_logs_little(tmp_path: Path) -> None:
    """1,000 idle clients that reconnect at once when closed, against 256 descriptors: scrapes
    are answered, each polling (``interval: 0``) with every part succeeding, and the log stays
    small."""
    config = write_config(tmp_path, "interval: 0\n")
    with exporter(config, "--log.level=debug", max_fds=256) as daemon:
        before = len(log_lines(daemon))
        cpu = cpu_seconds(daemon.proc.pid)
        began = time.monotonic()
        with Crowd(daemon.port, 1000) as crowd:
            for _ in range(5):
                scrape_up(daemon)
                time.sleep(0.5)
            took = time.monotonic() - began
        print(
            f"\n{crowd.connects} connects in {took:.1f} s, exporter CPU "
            f"{(cpu_seconds(daemon.proc.pid) - cpu) / took:.0%}"
        )
        wait_until(lambda: scrape_up(daemon) < 1, timeout=10, what="a prompt scrape after")
        warnings = [line for line in log_lines(daemon)[before:] if "level=debug" not in line]
        assert len(warnings) <= took / 10 * 3 + 3, warnings  # one per kind per 10 s
        assert_clean_log(daemon)


# --- anything unexpected ends the process, logged, so that it is restarted ------------------

FAULTS = {
    "the web event loop": "w.Server._expire = boom",
    "a web worker": "w.Server._serve = boom",
}


@pytest.mark.parametrize("thread", sorted(FAULTS))
def test_an_unexpected_exception_is_logged_once_and_exits_70(thread: str) -> None:
    port = free_port()
    code = (
        "import sys\nimport kvm_exporter.web as w\n"
        "def boom(*args):\n    raise RuntimeError('injected fault')\n"
        f"{FAULTS[thread]}\nfrom kvm_exporter.cli import main\nsys.exit(main())\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, f"--web.listen-address=127.0.0.1:{port}"],
        stderr=subprocess.PIPE,
        env={"PYTHONPATH": import_path()},
        cwd="/",
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            with contextlib.suppress(OSError, http.client.HTTPException):
                # A worker fails on it (the loop answers from what is rendered already, a
                # filtered scrape renders), the loop alone on anything.
                scrape(port, "/metrics?name[]=kvm_up", timeout=2)
        _, stderr = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_CRASH
    lines = stderr.splitlines()
    assert all(line.startswith("ts=") for line in lines), stderr
    [error] = error_lines(stderr)
    assert "level=error logger=kvm_exporter" in error
    assert f'msg="{thread} failed unexpectedly: exiting so that the supervisor' in error
    assert ' exc="Traceback (most recent call last):\\n' in error
    assert error.endswith('RuntimeError: injected fault"')


# --- finding 5: heads dripped a byte at a time, and heads too large -----------------------------


def test_a_head_dripped_byte_by_byte_is_served_and_scrapes_go_on() -> None:
    head = b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: 0123456789\r\n" * 400 + b"\r\n"
    with exporter() as daemon:
        stop = threading.Event()
        drippers = [
            threading.Thread(target=drip_head, args=(daemon.port, head, stop)) for _ in range(4)
        ]
        for dripper in drippers:
            dripper.start()
        try:
            for _ in range(5):
                scrape_up(daemon)
        finally:
            stop.set()
            for dripper in drippers:
                dripper.join()
        answer = raw_exchange(daemon.port, head)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nHealthy\n")
        assert_clean_log(daemon)


def test_a_head_over_the_cap_gets_431() -> None:
    with exporter() as daemon:
        answer = raw_exchange(daemon.port, b"GET / HTTP/1.1\r\nX: " + b"a" * 1_000_000)
        assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
        scrape_up(daemon)


# --- finding 6: HTTP errors ------------------------------------------------------------------

BAD_REQUESTS = [
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    (b"GET / HTTP/1.x\r\nHost: x\r\n\r\n", 400),
    (b"GET / FOO/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"GET /\x1b[2J\x00 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00" + b"\xff" * 5000 + b"\r\n\r\n", 400),
]


def test_bad_requests_get_a_status_line_and_a_short_escaped_log_line() -> None:
    with exporter(None, "--log.level=debug") as daemon:
        for request, status in BAD_REQUESTS:
            answer = raw_exchange(daemon.port, request)
            assert answer.startswith(f"HTTP/1.1 {status} ".encode()), (request, answer)
            assert b"\r\nConnection: close\r\n" in answer
        scrape_up(daemon)
        log = daemon.stderr()
        assert "\x1b" not in log and "\\\\x1b[2J\\\\x00" in log
        assert max(map(len, log.splitlines())) < 600
        assert_clean_log(daemon)


def test_an_accept_version_that_does_not_parse_gets_the_text_format_logged_once() -> None:
    accept = b"Accept: application/openmetrics-text; version=abc\r\n"
    with exporter() as daemon:
        for _ in range(50):
            answer = raw_exchange(daemon.port, b"GET /metrics HTTP/1.0\r\n" + accept + b"\r\n")
            assert answer.startswith(b"HTTP/1.0 200 OK\r\n")
            assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n" in answer
        logged = [line for line in log_lines(daemon) if "does not parse" in line]
        assert len(logged) == 1 and "level=warn" in logged[0]
        assert_clean_log(daemon)
