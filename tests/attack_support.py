"""Helpers of the attack and fault tests: exporters run as any user, with any stderr, and
checks that an exposition is valid for both Prometheus parsers."""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import resource
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import bcrypt
import cffi
import prometheus_client
import yaml
from conftest import REPO, SYSTEM_PYTHON, free_port, listens, samples, wait_until
from prom_support import binary
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from kvm_exporter.states import LINUX_STATES

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
NOBODY = 65534
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def import_path() -> str:
    """PYTHONPATH that lets any user import the package and its dependencies with Debian's
    python (the test venv's interpreter may sit where only root can read it)."""
    dirs = [str(REPO)]
    for module in (prometheus_client, yaml, cffi, bcrypt):
        site = str(Path(module.__file__ or "").resolve().parent.parent)
        if site not in dirs:
            dirs.append(site)
    return os.pathsep.join(dirs)


@contextmanager
def world_dir() -> Iterator[Path]:
    """A temporary directory every user can read (pytest's tmp_path is root's only)."""
    path = Path(tempfile.mkdtemp(prefix="kvm-attack-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Daemon:
    """``kvm_exporter`` as a real process on a loopback port, optionally as another user and
    with stderr sent anywhere (a file, ``/dev/full``)."""

    def __init__(
        self,
        config: Path | None,
        *args: str,
        user: int | None = None,
        stderr: str | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
        max_fds: int | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        python = sys.executable if user is None else SYSTEM_PYTHON
        cmd = [python, "-m", "kvm_exporter", f"--web.listen-address=127.0.0.1:{self.port}"]
        if config is not None:
            cmd.append(f"--config.file={config}")
        self.log_path = Path(stderr) if stderr else None
        self._final = ""
        if self.log_path is None:
            self._log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        else:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        environ = {**os.environ, "PYTHONPATH": import_path(), **(env or {})}
        owner: dict[str, Any] = {}
        if user is not None:
            owner = {"user": user, "group": user, "extra_groups": []}
        if max_fds is not None:  # as `ulimit -n max_fds` would
            owner["preexec_fn"] = lambda: resource.setrlimit(
                resource.RLIMIT_NOFILE, (max_fds, max_fds)
            )
        self.proc = subprocess.Popen(
            [*cmd, *args], stdin=subprocess.DEVNULL, stderr=self._log, env=environ, cwd="/", **owner
        )
        if wait:
            try:
                wait_until(self._answers, timeout=30, what=f"exporter on {self.url}")
            except BaseException:
                self.stop()
                raise

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"exporter exited {self.proc.returncode}: {self.stderr()}")
        return listens(self.proc.pid, self.port) and bool(self.get("/-/healthy"))

    def get(self, path: str = "/metrics", accept: str | None = None) -> str:
        headers = {"Accept": accept} if accept else {}
        request = urllib.request.Request(self.url + path, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            return str(response.read().decode("utf-8"))

    def metrics(self) -> Samples:
        return samples(self.get())

    def stderr(self) -> str:
        if self._log.closed:
            return self._final
        self._log.flush()
        if self.log_path is not None:  # a file, or a device such as /dev/full
            return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if not self._log.closed:
            self._final = self.stderr()
            self._log.close()
        return code


@contextmanager
def running(config: Path | None, *args: str, **kw: Any) -> Iterator[Daemon]:
    daemon = Daemon(config, *args, **kw)
    try:
        yield daemon
    finally:
        daemon.stop()


def write_config(directory: Path, text: str, name: str = "kvm_exporter.yml") -> Path:
    path = directory / name
    path.write_text(text)
    path.chmod(0o644)
    return path


def check_exposition(text: str) -> Samples:
    """The exposition passes ``promtool check metrics`` and prometheus_client's parser;
    returns its samples."""
    result = subprocess.run(
        [binary("promtool"), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    families = list(text_string_to_metric_families(text))
    assert {f.name for f in families} >= {"kvm_processes", "kvm_up"}
    return samples(text)


def check_openmetrics(text: str) -> None:
    """The OpenMetrics form parses with prometheus_client's strict OpenMetrics parser."""
    names = {f.name for f in openmetrics_families(text)}
    assert {"kvm_processes", "kvm_up"} <= names


def series(metrics: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: value for (n, labels), value in metrics.items() if n == name}


def value(metrics: Samples, name: str, **labels: str) -> float:
    return metrics[(name, frozenset(labels.items()))]


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "level=error" in line or "Traceback" in line]


def poll_until(check: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    """:func:`wait_until` for checks written as assertions: a failed assertion or a metric not
    there yet (KeyError) means "not yet"; the timeout message carries the last one."""
    last: list[str] = []

    def attempt() -> Any:
        try:
            return check()
        except (AssertionError, KeyError) as err:
            last[:] = [f"{type(err).__name__}: {err}"]
            return None

    try:
        return wait_until(attempt, timeout=timeout, what=what)
    except AssertionError as err:
        raise AssertionError(f"{err}; last: {last}") from None


def frozen_proc(dest: Path, pids: set[int]) -> Counter[str]:
    """Copy what the procfs source reads from /proc into ``dest`` for ``pids`` (those still
    there); returns the copied processes' states (the exporter's words) plus ``_procs`` and
    ``_threads`` totals."""
    (dest / "sys" / "kernel").mkdir(parents=True)
    for name in ("loadavg", "stat", "swaps", "sys/kernel/pid_max", "sys/kernel/threads-max"):
        (dest / name).write_bytes(Path("/proc", name).read_bytes())
    totals: Counter[str] = Counter()
    for pid in map(str, pids):
        try:
            stat = Path("/proc", pid, "stat").read_bytes()
            status = Path("/proc", pid, "status").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if not stat or not status:
            continue
        (dest / pid).mkdir()
        owner = os.stat(Path("/proc", pid))
        os.chown(dest / pid, owner.st_uid, owner.st_gid)  # the census takes the uid from it
        (dest / pid / "stat").write_bytes(stat)
        (dest / pid / "status").write_bytes(status)
        fields = stat[stat.rindex(b")") + 2 :].split()
        totals[LINUX_STATES.get(fields[0].decode(), "unknown")] += 1
        totals["_procs"] += 1
        totals["_threads"] += int(fields[17])
    return totals


def scrape_until(daemon: Daemon, good: Any, what: str, timeout: float = 30.0) -> Samples:
    """Scrape ``daemon`` until ``good(metrics)`` holds; returns those metrics."""

    def attempt() -> Samples | None:
        metrics = daemon.metrics()
        return metrics if good(metrics) else None

    result: Samples = poll_until(attempt, timeout=timeout, what=what)
    return result


# --- attackers and a legitimate scraper, for tests/test_attack.py and bench/attack.py ------------

PARTIAL_HEAD = b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
"""A request head that a slowloris client starts and never ends."""


def client_hello() -> bytes:
    """The first flight of a real TLS client: what a client that stalls after ClientHello
    sends."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = ssl.create_default_context()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


class Crowd:
    """``count`` connections to ``port`` on loopback, driven by one thread: each sends
    ``opening`` once connected, then ``drip`` every ``every`` seconds (if any), and reads and
    drops what the server sends; a connection the server closes is opened again."""

    def __init__(
        self, port: int, count: int, opening: bytes = b"", drip: bytes = b"", every: float = 1.0
    ) -> None:
        self.address = ("127.0.0.1", port)
        self.count, self.opening, self.drip, self.every = count, opening, drip, every
        self.connects = 0
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Crowd:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _open(self) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        if sock.connect_ex(self.address) not in (0, errno.EINPROGRESS):
            sock.close()
            return
        self.connects += 1
        self._selector.register(sock, selectors.EVENT_WRITE)

    def _run(self) -> None:
        try:
            for _ in range(self.count):
                self._open()
            next_drip = time.monotonic() + self.every
            while not self._stop.is_set():
                for key, mask in self._selector.select(0.05):
                    self._on_event(key.fileobj, mask)  # type: ignore[arg-type]
                missing = self.count - len(self._selector.get_map())
                for _ in range(min(missing, 64)):
                    self._open()
                if self.drip and time.monotonic() >= next_drip:
                    next_drip += self.every
                    for key in list(self._selector.get_map().values()):
                        if key.events == selectors.EVENT_READ:
                            with contextlib.suppress(OSError):
                                key.fileobj.send(self.drip)  # type: ignore[union-attr]
        finally:
            for key in list(self._selector.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
            self._selector.close()

    def _on_event(self, sock: socket.socket, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    raise ConnectionRefusedError
                if self.opening:
                    sock.send(self.opening)
                self._selector.modify(sock, selectors.EVENT_READ)
                return
            if sock.recv(65536):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._selector.unregister(sock)
        sock.close()


def drip_head(port: int, head: bytes, stop: threading.Event) -> None:
    """Send ``head`` one byte per send, as fast as the server takes it, over and over."""
    while not stop.is_set():
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        ):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(len(head)):
                if stop.is_set():
                    return
                sock.send(head[i : i + 1])
            sock.recv(65536)


def scrape(
    port: int, path: str = "/metrics", context: ssl.SSLContext | None = None, timeout: float = 10
) -> tuple[int, bytes, float]:
    """One scrape on a new connection: status, body and seconds taken."""
    began = time.perf_counter()
    conn: http.client.HTTPConnection
    if context is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=context)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        return response.status, body, time.perf_counter() - began
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a new connection, half-close, and return all the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        received = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                received += chunk
        return received


def rss_mib(pid: int) -> float:
    """The resident size of process ``pid``, MiB."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if "VmRSS" in x)
    return int(line.split()[1]) / 1024


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
