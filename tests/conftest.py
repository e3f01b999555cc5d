"""Shared test helpers: free ports, and real exporter processes on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
"""Debian's python, for child processes that run as another user: a venv's interpreter may
live where only root can read it (pyenv under /root)."""


PROC_FIXTURE = REPO / "tests" / "fixtures" / "proc"
"""A frozen procfs tree: a handful of processes with hostile names, every state, threads."""


def own_like_status(root: Path) -> Path:
    """Give each ``root/PID`` directory the owner the kernel gives ``/proc/PID``: the effective
    uid of its ``status`` (a copy made by root belongs to root). Returns ``root``."""
    for pid_dir in root.iterdir():
        status = pid_dir / "status"
        if pid_dir.name.isdigit() and status.is_file():
            uid_line = next(x for x in status.read_text().splitlines() if x.startswith("Uid:"))
            os.chown(pid_dir, int(uid_line.split()[2]), -1)
    return root


def copy_proc_fixture(dest: Path) -> Path:
    """A writable copy of :data:`PROC_FIXTURE` at ``dest``, owned like the real thing."""
    shutil.copytree(PROC_FIXTURE, dest)
    return own_like_status(dest)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself holds a TCP socket listening on ``port``.

    A port picked by :func:`free_port` is only free when picked: another suite on the same
    machine may take it first. Checking the socket's owner keeps a test from ever talking to
    someone else's server."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in rows.readlines()[1:]:
                fields = row.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except FileNotFoundError:
        return False
    for name in names:
        try:
            if os.readlink(f"{fd_dir}/{name}") in inodes:
                return True
        except FileNotFoundError:
            continue
    return False


def exited_or_listens(proc: subprocess.Popen[Any], port: int) -> bool:
    """Whether ``proc`` has either exited or bound ``port`` (see :func:`listens`)."""
    return proc.poll() is not None or listens(proc.pid, port)


def wrapped_exporter_reads(wrapper: subprocess.Popen[Any], port: int, name: str) -> str:
    """``/proc/PID/<name>`` of an exporter that ``wrapper`` (strace, runuser) forked, once it
    listens on ``port``; the exporter is then stopped with SIGTERM and the wrapper must exit
    0. The wrapper is killed if anything fails."""
    try:
        children = Path(f"/proc/{wrapper.pid}/task/{wrapper.pid}/children")
        pid = int(wait_until(lambda: children.read_text().split(), what="the exporter")[0])
        wait_until(lambda: listens(pid, port), timeout=30, what="the exporter to listen")
        text = Path(f"/proc/{pid}/{name}").read_text()
        os.kill(pid, signal.SIGTERM)
        assert wrapper.wait(timeout=20) == 0
        return text
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
            wrapper.wait()


def wait_until(check: Any, timeout: float = 10.0, what: str = "condition") -> Any:
    """Call ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, keyed by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class Exporter:
    """A real ``kvm_exporter`` process serving on a free loopback port."""

    def __init__(self, tmp: Path, config: str | None, args: list[str], env: dict[str, str]):
        for _attempt in range(5):  # another suite may take the free port before we bind it
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            cmd = [sys.executable, "-m", "kvm_exporter"]
            cmd.append(f"--web.listen-address=127.0.0.1:{self.port}")
            if config is not None:
                self.config_path = tmp / f"kvm_exporter-{self.port}.yml"
                self.config_path.write_text(config)
                cmd.append(f"--config.file={self.config_path}")
            self.stderr_path = tmp / f"stderr-{self.port}.log"
            self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
            self.proc = subprocess.Popen(
                cmd + args, stderr=self._stderr, env={**os.environ, **env}, cwd="/"
            )
            try:
                wait_until(self._answers, what=f"exporter on {self.url}")
                return
            except AssertionError:
                if "in use" not in self.stderr():
                    self.stop()
                    raise
                self.stop()
        raise AssertionError("no free port after 5 attempts")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"exporter exited {self.proc.returncode}: {self.stderr()}")
        return listens(self.proc.pid, self.port) and bool(self.get("/-/healthy"))

    def get(self, path: str = "/metrics", headers: dict[str, str] | None = None) -> str:
        request = urllib.request.Request(self.url + path, headers=headers or {})
        with urllib.request.urlopen(request, timeout=10) as response:
            return str(response.read().decode())

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return samples(self.get())

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(timeout=10)
        self._stderr.close()
        return code


@pytest.fixture
def namespace() -> Iterator[str]:
    """A PID namespace with its own /proc; yields the host pid of its init. Everything in it
    is killed with it. An exporter given ``--path.procfs=/proc/INIT/root/proc`` sees its
    processes alone, whatever else the host runs."""
    unshare = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "sleep", "600"]
    )
    children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children")
    init = wait_until(lambda: children.read_text().split(), what="the namespace's init")[0]
    yield init
    unshare.kill()
    unshare.wait()


@pytest.fixture
def exporter(tmp_path: Path) -> Iterator[Any]:
    """Start exporters with ``exporter(config_yaml, *args, env={})``; all stop at teardown."""
    started: list[Exporter] = []

    def start(config: str | None = None, *args: str, env: dict[str, str] | None = None):
        started.append(Exporter(tmp_path, config, list(args), env or {}))
        return started[-1]

    yield start
    for e in started:
        e.stop()
