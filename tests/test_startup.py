"""Start-up: a scrape that arrives the instant the port accepts is answered by the first
poll, never by an empty snapshot (issue 11, defect 1)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import copy_proc_fixture, free_port, listens, samples

ROUNDS = 8


def first_scrape(config: Path, port: int) -> str:
    """Start an exporter and send GET /metrics on the first connection it accepts."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvm_exporter",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--config.file={config}",
        ],
        stderr=subprocess.DEVNULL,
        cwd="/",
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"exporter exited {proc.returncode}"
            assert time.monotonic() < deadline, "the exporter never accepted"
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=10)
                break
            except ConnectionRefusedError:
                continue  # no sleep: scrape the instant the port accepts
        assert listens(proc.pid, port), "another process took the port"
        with conn:
            conn.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            reply = b""
            while chunk := conn.recv(65536):
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], head
        return body.decode()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_scrape_the_instant_the_port_accepts_gets_the_first_poll(tmp_path: Path) -> None:
    root = copy_proc_fixture(tmp_path / "proc")
    config = tmp_path / "kvm_exporter.yml"
    config.write_text(f"procfs: {{root: {root}}}\ninterval: 1h\n")
    for _ in range(ROUNDS):
        got = samples(first_scrape(config, free_port()))
        assert got[("kvm_up", frozenset())] == 1
        assert got[("kvm_polls_total", frozenset())] == 1
        assert any(name == "kvm_processes" and value > 0 for (name, _), value in got.items())
