"""The HTTP(S) server: one event-loop thread feeding a bounded pool of worker threads.

The event loop accepts connections and, without ever blocking, takes each through its TLS
handshake and reads its request head; only a complete request goes to a worker, which runs
the WSGI app under socket timeouts and a deadline and then hands a keep-alive connection back
to the loop. A client that connects and sends nothing stays in the kernel for DEFER_ACCEPT
seconds (Linux), so it does not queue ahead of scrapes; then, or if it handshakes or sends
its request slowly, it costs a file descriptor until ``request_timeout``, never a thread, so
it cannot delay anyone else's scrape. Past ``Limits.handshakes`` TLS handshakes in flight,
the oldest is dropped unseen, which bounds OpenSSL's memory without making its client
reconnect. A client that sends its next request as soon as it has a response waits
behind the others and gets at most two workers, so scraping back to back cannot crowd out
Prometheus. Connections are capped below the file descriptor limit, so polls always
find the descriptors they need, and accepting backs off instead of spinning when the process
runs out of them anyway. An unexpected exception in the loop or a worker is logged and ends the
process with status 70, so the service manager restarts it instead of leaving it deaf.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import resource
import selectors
import socket
import ssl
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from errno import EMFILE, ENFILE, ENOBUFS, ENOMEM
from typing import TYPE_CHECKING
from urllib.parse import unquote

from kvm_exporter.auth import guarded
from kvm_exporter.config import listen_host_port
from kvm_exporter.http1 import HeadBuffer, HttpError, Request
from kvm_exporter.logs import crash
from kvm_exporter.memory import give_back
from kvm_exporter.quick import WouldBlock, refuse_to_block, without_blocking
from kvm_exporter.webconfig import WebSettings, ssl_context

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger("kvm_exporter.web")

FD_RESERVE = 64
"""File descriptors never spent on connections: polls, logs and reloads need them."""
FREED = 64
"""Connections closed since the most open at once after which the web loop gives memory back
(:func:`~kvm_exporter.memory.give_back`): a burst has ended."""
DEFER_ACCEPT = 3
"""Seconds the kernel (Linux: ``TCP_DEFER_ACCEPT``) keeps a connection that has sent nothing
out of the accept queue. Clients that connect and stay silent then cost neither a descriptor
nor an eviction, and do not queue ahead of a scrape, whose request arrives with its
connection: 1,000 idle clients reconnecting as soon as they are closed made every new scrape
wait 0.8 s behind them. After it the connection is accepted, silent or not; if the server
is full then, that connection is the one closed (see :meth:`Server._accept`)."""

ACCEPT_EVERY = 16
"""Ready connections the event loop serves between two looks at the listener: a new
connection (a scrape) waits behind at most these, not behind a thousand back-to-back
clients whose requests are all ready at once."""


class _Budget:
    """Connections all servers of this process (one per listen address) hold together: at
    most the file descriptor limit less FD_RESERVE."""

    def __init__(self) -> None:
        self.open, self.cap, self._wanted = 0, 0, 0
        self._lock = threading.Lock()

    def plan(self, connections: int) -> None:
        """A server that may hold ``connections`` starts (negative: stops)."""
        with self._lock:
            self._wanted += connections
            self.cap = max(1, _fd_limit(self._wanted + FD_RESERVE) - FD_RESERVE)

    def add(self, n: int) -> None:
        with self._lock:
            self.open += n


_BUDGET = _Budget()


class _Tokens:
    """A token bucket: ``rate`` tokens a second, at most a tenth of a second's (or one)
    saved."""

    def __init__(self, rate: int) -> None:
        self._rate, self._most = rate, max(1.0, rate / 10)
        self._level, self._at = 0.0, time.monotonic()

    def wait(self, now: float) -> float:
        """Seconds until a token is there; 0 if one is."""
        self._level = min(self._most, self._level + (now - self._at) * self._rate)
        self._at = now
        return 0.0 if self._level >= 1 else (1 - self._level) / self._rate

    def take(self) -> None:
        self._level -= 1


class WebError(Exception):
    """The server cannot start; the message is one line naming the address and the reason."""


@dataclass(frozen=True)
class Limits:
    workers: int = 16
    """Connections served at once; the server's thread count is this plus one."""
    connections: int = 1024
    """Connections open at once, and at most the file descriptor limit less FD_RESERVE. Past
    it the oldest connection no worker is serving is closed (at most ``evictions`` a second;
    past that, accepting pauses)."""
    evictions: int = 1000
    handshakes: int = 256
    """TLS handshakes in flight at once (OpenSSL holds about 43 KiB for each). Past it, the
    oldest one in flight, if it began at least ``handshake_grace`` ago, is dropped: its TLS
    state freed, its connection left open and unread until ``request_timeout``. A real
    client's handshake takes one round trip, so the oldest is one that stalled; a new client
    begins at once; and a stalled client is not told, so it does not reconnect to make the
    server do another key exchange."""
    handshake_grace: float = 0.1
    """Seconds a handshake in flight is safe from being dropped for a newer one; more than
    ``handshakes`` are in flight while all began within it."""
    request_timeout: float = 10.0
    """Most seconds from connecting, or from the first byte after a response, to a complete
    request head, TLS handshake included."""
    idle_timeout: float = 120.0
    """Most seconds a keep-alive connection waits for its next request."""
    read_timeout: float = 10.0
    """Socket timeout of each read and write once a worker has the request."""
    deadline: float = 30.0
    """Most seconds a worker spends on one request."""


def parse_listen_address(address: str) -> tuple[str, int]:
    """(host, port) from ``:9429``, ``0.0.0.0:9429``, ``[::1]:9429`` or ``localhost:9429``."""
    try:
        return listen_host_port(address)
    except ValueError as err:
        raise WebError(f"cannot listen on {address}: expected {err}") from None


def listen_target(address: str) -> tuple[socket.AddressFamily, tuple[str, int]]:
    """The family and socket address that listening on ``address`` binds, its host looked up
    (no host: every interface, IPv6 and IPv4 where the system can). Raises WebError."""
    host, port = parse_listen_address(address)
    if not host:
        return (socket.AF_INET6 if socket.has_dualstack_ipv6() else socket.AF_INET), ("", port)
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except OSError as err:
        raise _cannot_listen(address, err) from None
    return family, (str(sockaddr[0]), int(sockaddr[1]))


def _listen(address: str) -> socket.socket:
    family, sockaddr = listen_target(address)
    dualstack = family == socket.AF_INET6 and not sockaddr[0]
    try:
        backlog = socket.SOMAXCONN  # as Go does; the kernel caps it at its own maximum
        return socket.create_server(
            sockaddr, family=family, dualstack_ipv6=dualstack, backlog=backlog
        )
    except OSError as err:
        raise _cannot_listen(address, err) from None


def _defer_accept(listener: socket.socket) -> bool:
    """Set :data:`DEFER_ACCEPT` on ``listener`` where the system has it (Linux); whether
    it is set."""
    if not hasattr(socket, "TCP_DEFER_ACCEPT"):
        return False
    try:
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT)
    except OSError:
        return False
    return True


def _silent(sock: socket.socket) -> bool:
    """Whether a connection just accepted has nothing to read (or has ended)."""
    try:
        return not sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:  # nothing yet, or broken
        return True


def _cannot_listen(address: str, err: OSError) -> WebError:
    reason = err.strerror if isinstance(err, socket.gaierror) else None
    reason = reason or (os.strerror(err.errno) if err.errno else str(err))
    return WebError(f"cannot listen on {address}: {reason[:1].lower()}{reason[1:]}")


def _fd_limit(wanted: int) -> int:
    """The file descriptor limit, first raised towards ``wanted`` if the hard limit allows
    (Go programs raise it to the hard limit at start)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    return wanted if soft == resource.RLIM_INFINITY else soft


def _fatal_on_error(target: Callable[[], None], what: str) -> Callable[[], None]:
    def run() -> None:
        try:
            target()
        except Exception:
            crash(what)

    return run


class _Throttled:
    """A log line at most once per ``interval`` seconds, saying how often it happened."""

    def __init__(self, level: int, interval: float = 10.0) -> None:
        self._level, self._interval = level, interval
        self._lock = threading.Lock()
        self._count, self._next = 0, 0.0

    def __call__(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            self._count += 1
            if now < self._next:
                return
            count, self._count, self._next = self._count, 0, now + self._interval
        if count > 1:
            msg += f" ({count} times in the last {self._interval:.0f} s)"
        log.log(self._level, msg, *args)


def _with_headers(app: WSGIApplication, headers: tuple[tuple[str, str], ...]) -> WSGIApplication:
    """WSGI middleware setting ``headers`` on every response."""
    names = {name.lower() for name, _ in headers}

    def add_headers(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        def start(
            status: str, response_headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
        ) -> Callable[[bytes], object]:
            kept = [(k, v) for k, v in response_headers if k.lower() not in names]
            return start_response(status, kept + list(headers), exc_info)

        return app(environ, start)

    return add_headers


@dataclass(eq=False)
class _Conn:
    """A connection: in one of the event loop's queues, or with a worker (``where`` None)."""

    sock: socket.socket
    peer: tuple[str, int]
    handshaken: bool
    buffer: HeadBuffer = field(default_factory=HeadBuffer)
    deadline: float = 0.0
    where: dict[_Conn, None] | None = None
    events: int = 0
    """What the selector watches it for; 0 when not registered."""
    closed: bool = False
    began: float = 0.0
    """When its TLS handshake began (monotonic)."""
    done: float = 0.0
    """When its last response was sent (monotonic), 0 before the first."""
    hasty: bool = False
    """Its last request came within _HASTY of the response before."""


_Sender = Callable[[bytes, Iterable[bytes], bool], None]
"""Sends a response's head and body (chunked or not)."""
_KEEP, _LINGER, _CLOSE = "keep", "linger", "close"
"""What a worker hands a connection back for: the next request, a lingering close, a close."""
_LINGER_SECONDS = 1.0
_HTTPS_ONLY = b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"


_HASTY = 0.25
"""A request sent this soon after the connection's previous response is served after all
others: a client scraping back to back cannot crowd out one that scrapes now and then."""


@dataclass(frozen=True)
class _Rest:
    """The part of a response the event loop could not send without blocking, and what to
    do with the connection after it."""

    data: bytes
    outcome: str


_Job = Request | _Rest
"""What a worker does for a connection: answer a request, or finish sending an answer."""


class _Requests:
    """Complete requests (or answers to finish) waiting for a worker: those of clients in no
    hurry first, and at most ``hasty_workers`` hasty ones at a time (fewer threads contending
    for the GIL)."""

    def __init__(self, hasty_workers: int) -> None:
        self._hasty_workers = hasty_workers
        self._hasty_running = 0
        self._cond = threading.Condition()
        self._queues: tuple[deque[tuple[_Conn, _Job]], ...] = (deque(), deque())
        self._closed = False

    def put(self, item: tuple[_Conn, _Job], hasty: bool) -> None:
        with self._cond:
            self._queues[hasty].append(item)
            self._cond.notify()

    def get(self) -> tuple[_Conn, _Job, bool] | None:
        """The next request for a worker and whether it is hasty (then call :meth:`done`
        after it); None once closed."""
        with self._cond:
            while not self._closed:
                if self._queues[0]:
                    return (*self._queues[0].popleft(), False)
                if self._queues[1] and self._hasty_running < self._hasty_workers:
                    self._hasty_running += 1
                    return (*self._queues[1].popleft(), True)
                self._cond.wait()
            return None

    def hasty_backlog(self) -> int:
        return len(self._queues[1])

    def done(self) -> None:
        with self._cond:
            self._hasty_running -= 1
            self._cond.notify()

    def close(self) -> list[tuple[_Conn, _Job]]:
        """Wake every worker to stop; returns the requests no worker took."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            left = [*self._queues[0], *self._queues[1]]
            for waiting in self._queues:
                waiting.clear()
            return left


class _Lost(Exception):
    """The client went away while a worker was sending to it."""


def _sendall(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError as err:
        raise _Lost(err) from err


class Server:
    """A running server: ``address`` is the (host, port) bound, ``shutdown()`` stops it."""

    def __init__(
        self,
        listener: socket.socket,
        app: WSGIApplication,
        context: ssl.SSLContext | None,
        limits: Limits,
        quick_app: bool = False,
    ) -> None:
        """``quick_app``: ``app`` raises :class:`~kvm_exporter.quick.WouldBlock` where it
        would block inside :func:`~kvm_exporter.quick.without_blocking`, so the event loop
        may answer plain-HTTP requests itself (see :mod:`kvm_exporter.quick`)."""
        host, port = listener.getsockname()[:2]
        self.address: tuple[str, int] = (host, port)
        self._app, self._context, self._limits = app, context, limits
        self._here = quick_app and context is None
        self._listener = listener
        listener.setblocking(False)
        self._deferred = _defer_accept(listener)
        self.base_environ = {
            "SERVER_NAME": host or "localhost",
            "SERVER_PORT": str(port),
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SCRIPT_NAME": "",
            "REMOTE_HOST": "",
            "CONTENT_LENGTH": "",
            **({"HTTPS": "on"} if context else {}),
        }
        _BUDGET.plan(limits.connections)
        self._selector = selectors.DefaultSelector()
        self._wake, self._waker = socket.socketpair()
        self._wake.setblocking(False)
        self._waker.setblocking(False)
        self._selector.register(listener, selectors.EVENT_READ)
        self._selector.register(self._wake, selectors.EVENT_READ)
        self._listening, self._resume_at, self._backoff = True, 0.0, 0.0
        self._evictions = _Tokens(limits.evictions)
        # The loop's queues, oldest first; all in one queue have the same timeout.
        self._heads: dict[_Conn, None] = {}
        self._idle: dict[_Conn, None] = {}
        self._lingering: dict[_Conn, None] = {}
        self._handshakes: dict[_Conn, None] = {}
        """TLS connections whose handshake has begun and not ended, oldest first."""
        self._open = 0
        self._peak = 0
        """Most connections open since memory was last given back."""
        self._returned: deque[tuple[_Conn, str]] = deque()
        self._active: dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        self._requests = _Requests(max(1, limits.workers // 8))
        # Connections of hasty clients, not read while hasty requests are backed up: the
        # loop does not spend itself parsing requests that could only wait.
        self._cooling: deque[_Conn] = deque()
        self._pipelined: deque[_Conn] = deque()
        """Connections answered in the loop whose next request was read already."""
        self._stopping = threading.Event()
        self._refused = _Throttled(logging.WARNING)
        self._evicted = _Throttled(logging.WARNING)
        self._dropped = _Throttled(logging.WARNING)
        self._failed = _Throttled(logging.ERROR)
        self._threads = [
            threading.Thread(
                target=_fatal_on_error(self._loop, "the web event loop"),
                name="web-loop",
                daemon=True,
            )
        ]
        self._threads += [
            threading.Thread(
                target=_fatal_on_error(self._work, "a web worker"), name=f"web-{i}", daemon=True
            )
            for i in range(limits.workers)
        ]
        for thread in self._threads:
            thread.start()

    def shutdown(self) -> None:
        """Stop accepting, cut every connection and return within about a second."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        _BUDGET.plan(-self._limits.connections)
        # Only a nudge: the loop also sees _stopping within its 0.25 s select timeout, so a
        # wake-up socket that is already gone must not keep shutdown from finishing.
        with contextlib.suppress(OSError):
            self._waker.send(b"\0")
        end = time.monotonic() + 1.0
        self._threads[0].join(1.0)
        for waiting, _ in self._requests.close():
            waiting.sock.close()
        with self._lock:
            for sock in self._active:
                _cut(sock)
        for thread in self._threads[1:]:
            thread.join(max(0.0, end - time.monotonic()))
        while self._returned:
            self._returned.popleft()[0].sock.close()
        self._waker.close()

    # --- the event loop: accepting, handshakes, request heads, lingering closes ------------

    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                timeout = 0.0 if self._pipelined else 0.25  # pipelined: read, not waited for
                if not self._listening:
                    timeout = min(timeout, max(0.0, self._resume_at - time.monotonic()))
                for done, (key, _) in enumerate(self._selector.select(timeout), 1):
                    conn = key.data
                    if key.fileobj is self._listener:
                        self._accept()
                    elif conn is None:
                        self._take_back()
                    elif conn.events:  # not closed or handed on earlier in this batch
                        self._on_ready(conn)
                    if done % ACCEPT_EVERY == 0 and self._listening:
                        self._accept()
                while self._cooling and self._requests.hasty_backlog() < 4:
                    self._keep(self._cooling.popleft())
                for _ in range(len(self._pipelined)):  # those that came in meanwhile wait
                    conn = self._pipelined.popleft()
                    if conn.where is self._heads:  # not closed, not with a worker
                        self._advance(conn)
                now = time.monotonic()
                self._expire(now)
                self._peak = max(self._peak, self._open)
                if self._peak - self._open >= FREED and give_back():  # a burst has ended:
                    self._peak = self._open  # its buffers (TLS: 40 KiB each) go back
                if not self._listening and now >= self._resume_at:
                    self._selector.register(self._listener, selectors.EVENT_READ)
                    self._listening = True
        finally:
            for where in (self._heads, self._idle, self._lingering):
                for conn in list(where):
                    self._close(conn)
            for conn in self._cooling:
                self._close(conn)
            self._selector.close()
            self._listener.close()
            self._wake.close()

    def _accept(self) -> None:
        for _ in range(64):  # then back to the loop, so that a flood cannot starve it
            if not self._room():
                return
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno not in (EMFILE, ENFILE, ENOBUFS, ENOMEM):
                    log.debug("cannot accept a connection: %s", err)
                    continue
                # Out of descriptors or memory: leave the rest in the kernel's queue for a
                # while, longer each time, and serve the connections already open.
                self._backoff = min(1.0, max(0.01, self._backoff * 2))
                self._pause(time.monotonic() + self._backoff)
                self._refused(
                    "cannot accept connections: %s; serving the open ones, accepting again "
                    "in %.2f s",
                    err.strerror, self._backoff,
                )  # fmt: skip
                return
            self._backoff = 0.0
            if self._full():
                if self._deferred and _silent(sock):
                    # Silent for DEFER_ACCEPT seconds already: it goes, not one that spoke.
                    # The kernel holds each such client that long, so they cost no tokens.
                    self._evicted(
                        "%d connections open, the most allowed: closing new ones silent for %d s",
                        min(self._limits.connections, _BUDGET.cap), DEFER_ACCEPT,
                    )  # fmt: skip
                    sock.close()
                    continue
                self._evict()
            self._open += 1
            _BUDGET.add(1)
            conn = _Conn(sock, peer, handshaken=self._context is None)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self._context is not None:
                    conn.sock = self._context.wrap_socket(
                        sock, server_side=True, do_handshake_on_connect=False
                    )
            except OSError as err:
                log.debug("%s: %s", peer[0], err)
                sock.close()
                self._close(conn)
                continue
            self._queue(conn, self._heads, self._limits.request_timeout)
            if self._context is not None:
                self._begin_handshake(conn)
            # Its request or ClientHello (with TCP_DEFER_ACCEPT, almost always) or its end
            # is here already: read it now, without a trip through the selector.
            self._advance(conn)

    def _begin_handshake(self, conn: _Conn) -> None:
        """Count ``conn`` among the handshakes in flight, dropping the oldest of them if that
        makes too many (see :attr:`Limits.handshakes`)."""
        conn.began = time.monotonic()
        if len(self._handshakes) >= self._limits.handshakes:
            oldest = next(iter(self._handshakes))
            if oldest.began <= conn.began - self._limits.handshake_grace:
                self._drop_handshake(oldest)
        self._handshakes[conn] = None

    def _drop_handshake(self, conn: _Conn) -> None:
        """Free the TLS state of ``conn`` but keep its connection, unread, until its
        deadline: to the client it is still a stalled handshake."""
        self._dropped(
            "%d TLS handshakes in flight, the most allowed: dropping the oldest",
            self._limits.handshakes,
        )
        del self._handshakes[conn]
        if conn.events:  # it stays in its place among the heads, its deadline kept
            self._selector.unregister(conn.sock)
            conn.events = 0
        conn.sock = socket.socket(fileno=conn.sock.detach())  # the SSL object goes with it

    def _room(self) -> bool:
        """Whether a connection may be accepted now (maybe after closing the oldest one no
        worker has, see :meth:`_evict`); if not, accepting pauses."""
        if not self._full():
            return True
        if not (self._lingering or self._heads or self._idle):
            # Every connection is with a worker: until one closes, or, if the other servers
            # hold the descriptors, a while.
            own = self._open >= self._limits.connections
            self._pause(float("inf") if own else time.monotonic() + 0.05)
            return False
        now = time.monotonic()
        if wait := self._evictions.wait(now):
            self._pause(now + wait)
            return False
        return True

    def _full(self) -> bool:
        return self._open >= self._limits.connections or _BUDGET.open >= _BUDGET.cap

    def _evict(self) -> None:
        self._evictions.take()
        self._evicted(
            "%d connections open, the most allowed: closing the oldest waiting ones",
            min(self._limits.connections, _BUDGET.cap),
        )
        self._close(next(iter(self._lingering or self._heads or self._idle)))

    def _pause(self, until: float) -> None:
        if self._listening:
            self._selector.unregister(self._listener)
            self._listening = False
        self._resume_at = until

    def _take_back(self) -> None:
        """Connections the workers are done with."""
        with contextlib.suppress(OSError):
            while self._wake.recv(4096):
                pass
        while self._returned:
            conn, outcome = self._returned.popleft()
            if outcome == _LINGER:
                self._linger(conn)
            elif outcome == _CLOSE:
                self._close(conn)
            elif conn.hasty and self._requests.hasty_backlog() >= 4:
                self._cooling.append(conn)
            else:
                self._keep(conn)

    def _answered_here(self, conn: _Conn, outcome: str) -> None:
        """After a response the loop sent whole: what ``outcome`` says."""
        if outcome == _LINGER:
            self._linger(conn)
        elif outcome == _CLOSE:
            self._close(conn)
        else:
            conn.done = time.monotonic()
            if conn.buffer:  # its next request is read already: after this round's others
                self._queue(conn, self._heads, self._limits.request_timeout)
                self._pipelined.append(conn)
            else:
                self._hold(conn, self._idle, self._limits.idle_timeout)

    def _keep(self, conn: _Conn) -> None:
        """Wait for the next request of a connection kept alive."""
        conn.sock.setblocking(False)
        conn.done = time.monotonic()
        if conn.buffer:  # the client sent its next request already
            self._hold(conn, self._heads, self._limits.request_timeout)
            self._advance(conn)
        else:
            self._hold(conn, self._idle, self._limits.idle_timeout)

    def _on_ready(self, conn: _Conn) -> None:
        if conn.where is self._lingering:
            self._discard(conn)
        else:
            self._advance(conn)

    def _advance(self, conn: _Conn) -> None:
        """Take the handshake and the request head as far as the bytes at hand allow."""
        events = selectors.EVENT_READ
        try:
            if isinstance(conn.sock, ssl.SSLSocket) and not conn.handshaken:
                conn.sock.do_handshake()
                conn.handshaken = True
                del self._handshakes[conn]
            while (request := conn.buffer.take()) is None:
                chunk = conn.sock.recv(8192)
                if not chunk:
                    self._close(conn)
                    return
                if conn.where is self._idle:
                    self._hold(conn, self._heads, self._limits.request_timeout)
                conn.buffer.feed(chunk)
        except (ssl.SSLWantReadError, BlockingIOError):
            pass
        except ssl.SSLWantWriteError:
            events = selectors.EVENT_WRITE
        except HttpError as err:
            log.debug("%s: %s", conn.peer[0], err)
            self._refuse(conn, err.response())
            return
        except ssl.SSLError as err:
            log.debug("%s: %s", conn.peer[0], err)
            if err.reason == "HTTP_REQUEST":  # plain HTTP to the TLS port: say so, as Go does
                self._refuse(conn, _HTTPS_ONLY, raw=True)
            else:
                self._close(conn)
            return
        except OSError as err:
            log.debug("%s: %s", conn.peer[0], err)
            self._close(conn)
            return
        else:
            self._dispatch(conn, request)
            return
        self._watch(conn, events)

    def _dispatch(self, conn: _Conn, request: Request) -> None:
        if self._here and self._answer_here(conn, request):
            return
        self._to_worker(conn, request)

    def _to_worker(self, conn: _Conn, job: _Job) -> None:
        self._release(conn)
        conn.hasty = bool(conn.done) and time.monotonic() - conn.done < _HASTY
        self._requests.put((conn, job), conn.hasty)

    def _answer_here(self, conn: _Conn, request: Request) -> bool:
        """Answer ``request`` in the loop, sending what the socket takes at once and handing
        the rest to a worker; False if the app cannot answer without blocking."""
        rest: list[bytes] = []

        def send(head: bytes, body: Iterable[bytes], chunked: bool) -> None:
            data = head + b"".join(body)  # a list: iterators were refused
            try:
                sent = socket.socket.send(conn.sock, data)
            except BlockingIOError:
                sent = 0
            except OSError as err:
                raise _Lost(err) from err
            rest.append(data[sent:])

        try:
            with without_blocking():
                keep = self._respond(conn, request, send)
        except WouldBlock:
            return False
        except _Lost as err:
            log.debug("%s: connection lost: %s", conn.peer[0], err)
            self._close(conn)
            return True
        outcome = _outcome(request, keep)
        if rest and rest[0]:
            self._to_worker(conn, _Rest(rest[0], outcome))
        else:
            self._answered_here(conn, outcome)
        return True

    def _refuse(self, conn: _Conn, response: bytes, raw: bool = False) -> None:
        """Send a short error response without blocking, then close without a reset."""
        try:
            (socket.socket.send if raw else type(conn.sock).send)(conn.sock, response)
        except OSError:
            self._close(conn)
            return
        self._linger(conn)

    def _linger(self, conn: _Conn) -> None:
        """Close for writing, then read and drop what the client still sends for a second,
        so that the kernel does not reset the connection under the response."""
        with contextlib.suppress(OSError):
            socket.socket.shutdown(conn.sock, socket.SHUT_WR)
        conn.sock.setblocking(False)
        self._hold(conn, self._lingering, _LINGER_SECONDS)

    def _discard(self, conn: _Conn) -> None:
        try:
            for _ in range(4):
                if not socket.socket.recv(conn.sock, 65536):
                    break
            else:
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._close(conn)

    def _hold(self, conn: _Conn, where: dict[_Conn, None], timeout: float) -> None:
        """Put ``conn`` last in the loop's queue ``where``, watched for reading."""
        self._queue(conn, where, timeout)
        self._watch(conn, selectors.EVENT_READ)

    def _queue(self, conn: _Conn, where: dict[_Conn, None], timeout: float) -> None:
        """Put ``conn`` last in the loop's queue ``where``, its deadline ``timeout`` away."""
        if conn.where is not None:
            del conn.where[conn]
        conn.where, where[conn] = where, None
        conn.deadline = time.monotonic() + timeout

    def _watch(self, conn: _Conn, events: int) -> None:
        if not conn.events:
            self._selector.register(conn.sock, events, conn)
        elif conn.events != events:
            self._selector.modify(conn.sock, events, conn)
        conn.events = events

    def _release(self, conn: _Conn) -> None:
        """Take ``conn`` out of the loop's queues and selector (for a worker, or to close)."""
        if conn.where is not None:
            del conn.where[conn]
            conn.where = None
        if conn.events:
            self._selector.unregister(conn.sock)
            conn.events = 0

    def _close(self, conn: _Conn) -> None:
        if conn.closed:  # closing twice is harmless: an evicted connection may have events
            return
        self._release(conn)
        self._handshakes.pop(conn, None)
        conn.closed = True
        conn.sock.close()
        self._open -= 1
        _BUDGET.add(-1)
        if self._resume_at == float("inf"):
            self._resume_at = 0.0

    def _expire(self, now: float) -> None:
        for where in (self._heads, self._idle, self._lingering):
            while where:
                conn = next(iter(where))
                if conn.deadline > now:
                    break  # oldest first: the rest are younger
                self._close(conn)
        with self._lock:
            for sock, deadline in self._active.items():
                if deadline <= now:
                    _cut(sock)

    # --- workers ---------------------------------------------------------------------------

    def _work(self) -> None:
        while (item := self._requests.get()) is not None:
            conn, request, hasty = item
            outcome = self._serve(conn, request)
            if hasty:
                self._requests.done()
            if self._stopping.is_set():
                conn.sock.close()
                continue
            self._returned.append((conn, outcome))
            with contextlib.suppress(OSError):  # a full wake-up socket wakes the loop anyway
                self._waker.send(b"\0")

    def _serve(self, conn: _Conn, job: _Job) -> str:
        with self._lock:
            self._active[conn.sock] = time.monotonic() + self._limits.deadline
        try:
            if self._stopping.is_set():
                return _CLOSE
            conn.sock.settimeout(self._limits.read_timeout)
            if isinstance(job, _Rest):
                _sendall(conn.sock, job.data)
                return job.outcome
            return _outcome(job, self._respond(conn, job, functools.partial(_send, conn.sock)))
        except _Lost as err:
            log.debug("%s: connection lost: %s", conn.peer[0], err)
            return _CLOSE
        finally:
            with self._lock:
                del self._active[conn.sock]

    def _respond(self, conn: _Conn, request: Request, send: _Sender) -> bool:
        """Run the app on ``request`` and ``send`` its response; whether to keep the
        connection. In the loop (``send`` taking only lists) an app returning an iterator
        raises WouldBlock before it runs."""
        started: list[tuple[str, list[tuple[str, str]]]] = []
        early: list[bytes] = []
        sent = False

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
        ) -> Callable[[bytes], object]:
            if exc_info is not None and sent:
                raise exc_info[1].with_traceback(exc_info[2])  # type: ignore[union-attr]
            if started and exc_info is None:
                raise AssertionError("start_response called twice")
            started[:] = [(status, list(headers))]
            return early.append

        try:
            result = self._app(self._environ(conn, request), start_response)
            try:
                if not isinstance(result, (list, tuple)):
                    refuse_to_block()  # its first next() may block; a worker runs it again
                body = _started(result, early)
                if not started:
                    raise AssertionError("the application did not call start_response")
                status, headers = started[0]
                head, chunked, keep = _response_head(request, status, headers, body)
                sent = True
                send(head, [] if request.method == "HEAD" else body, chunked)
            finally:
                if hasattr(result, "close"):
                    result.close()
        except (_Lost, WouldBlock):
            raise
        except Exception as err:
            trace = "".join(traceback.format_exception(err)).rstrip()
            self._failed("%s: %s failed: %s", conn.peer[0], request.line, trace)
            if not sent:
                _sendall(conn.sock, HttpError(500, "internal server error").response())
            return False
        log.debug('%s "%s" %s', conn.peer[0], request.line, status.partition(" ")[0])
        return keep

    def _environ(self, conn: _Conn, request: Request) -> WSGIEnvironment:
        environ: WSGIEnvironment = {
            **self.base_environ,
            "REQUEST_METHOD": request.method,
            "PATH_INFO": unquote(request.path, "latin-1"),
            "QUERY_STRING": request.query,
            "SERVER_PROTOCOL": request.version,
            "REMOTE_ADDR": conn.peer[0],
            "REMOTE_PORT": str(conn.peer[1]),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "https" if self._context else "http",
            "wsgi.input": io.BytesIO(),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for name, value in request.headers:
            if "_" in name:  # X_Y would pass for X-Y: dropped, as wsgiref does
                continue
            key = name.upper().replace("-", "_")
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                key = "HTTP_" + key
                value = f"{environ[key]},{value}" if key in environ else value
            environ[key] = value
        return environ


def _started(result: Iterable[bytes], early: list[bytes]) -> list[bytes] | Iterator[bytes]:
    """The body of ``result``, once the app has called start_response (a generator may call
    it only when it yields its first chunk)."""
    if isinstance(result, (list, tuple)):
        return [*early, *result]
    chunks = iter(result)
    first = next((chunk for chunk in chunks if chunk), b"")
    return _chain(early, first, chunks) if first else list(early)


def _chain(early: list[bytes], first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield from early
    yield first
    yield from rest


def _response_head(
    request: Request,
    status: str,
    headers: list[tuple[str, str]],
    body: list[bytes] | Iterator[bytes],
) -> tuple[bytes, bool, bool]:
    """The status line and headers; whether the body goes chunked; whether to keep alive."""
    keep, chunked = request.keep_alive, False
    if not any(name.lower() == "content-length" for name, _ in headers):
        if isinstance(body, list):
            headers.append(("Content-Length", str(sum(map(len, body)))))
        elif request.version == "HTTP/1.1":
            chunked = request.method != "HEAD"
            if chunked:
                headers.append(("Transfer-Encoding", "chunked"))
        else:
            keep = False  # the end of the connection is the end of the body
    if not keep and request.version == "HTTP/1.1":
        headers.append(("Connection", "close"))
    elif keep and request.version == "HTTP/1.0":
        headers.append(("Connection", "keep-alive"))
    lines = [f"{request.version} {status}", f"Date: {formatdate(usegmt=True)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), chunked, keep


def _outcome(request: Request, keep: bool) -> str:
    """What to do with a connection after answering ``request``."""
    if keep:
        return _KEEP
    return _LINGER if request.has_body else _CLOSE


def _send(sock: socket.socket, head: bytes, body: Iterable[bytes], chunked: bool) -> None:
    """Send the head with the first chunk, then each chunk as the app yields it (PEP 3333
    forbids holding one back)."""
    pending = [head]
    for chunk in body:
        if chunk:
            pending += [b"%x\r\n" % len(chunk), chunk, b"\r\n"] if chunked else [chunk]
            if not isinstance(body, list):
                _sendall(sock, b"".join(pending))
                pending = []
    if chunked:
        pending.append(b"0\r\n\r\n")
    if pending:
        _sendall(sock, b"".join(pending))


def _cut(conn: socket.socket) -> None:
    """Shut the socket down so that a worker blocked on it returns at once."""
    # socket.socket's own shutdown: SSLSocket's would drop its SSL object under the worker.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(conn, socket.SHUT_RDWR)


def serve(
    app: WSGIApplication,
    listen_address: str,
    settings: WebSettings | None,
    limits: Limits | None = None,
    quick_app: bool = False,
) -> Server:
    """Serve ``app`` on ``listen_address`` with the TLS, basic auth and headers of ``settings``
    (``quick_app``: see :class:`Server`).

    Raises WebError if the address is bad or taken, ConfigError if a TLS file no longer loads.
    """
    context = None
    if settings is not None:
        app = guarded(app, settings)
        if settings.http.headers:
            app = _with_headers(app, settings.http.headers)
        if settings.tls is not None:
            context = ssl_context(settings.tls)
    return Server(_listen(listen_address), app, context, limits or Limits(), quick_app)
