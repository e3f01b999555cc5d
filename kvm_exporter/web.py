"""The HTTP(S) server: one event-loop thread feeding a bounded pool of worker threads.

The event loop accepts connections and, without ever blocking, takes each through its TLS
handshake and reads its request head; only a complete request goes to a worker, which runs
the WSGI app under socket timeouts and a deadline. A client that connects and sends nothing,
or handshakes or sends its request slowly, costs a file descriptor until ``request_timeout``,
never a thread, so it cannot delay anyone else's scrape.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import queue
import re
import selectors
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler

from kvm_exporter.auth import guarded
from kvm_exporter.config import listen_host_port
from kvm_exporter.webconfig import WebSettings, ssl_context

if TYPE_CHECKING:
    from _typeshed import OptExcInfo, WriteableBuffer
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger("kvm_exporter.web")


class WebError(Exception):
    """The server cannot start; the message is one line naming the address and the reason."""


@dataclass(frozen=True)
class Limits:
    workers: int = 16
    """Connections served at once; the server's thread count is this plus one."""
    queued: int = 64
    """Requests waiting for a worker; past it new ones are closed."""
    waiting: int = 256
    """Connections still handshaking or sending their request head (no thread is spent on
    them); past it the oldest is closed."""
    request_timeout: float = 10.0
    """Most seconds from connecting to a complete request head, TLS handshake included."""
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
        return socket.create_server(sockaddr, family=family, dualstack_ipv6=dualstack, backlog=128)
    except OSError as err:
        raise _cannot_listen(address, err) from None


def _cannot_listen(address: str, err: OSError) -> WebError:
    reason = err.strerror if isinstance(err, socket.gaierror) else None
    reason = reason or (os.strerror(err.errno) if err.errno else str(err))
    return WebError(f"cannot listen on {address}: {reason[:1].lower()}{reason[1:]}")


class _ServerHandler(ServerHandler):
    """wsgiref's handler logging through logging, a connection lost mid-response at debug."""

    # Set by wsgiref at run time; typeshed does not declare them.
    headers_sent: bool
    request_handler: WSGIRequestHandler

    def log_exception(self, exc_info: OptExcInfo) -> None:
        peer = self.request_handler.client_address[0]
        if isinstance(exc_info[1], OSError) and self.headers_sent:
            log.debug("%s: connection lost: %s", peer, exc_info[1])
        else:
            log.error("%s: request failed", peer, exc_info=exc_info)


class _HeadFirst(io.RawIOBase):
    """The request head the event loop has already read, then the rest from the socket."""

    def __init__(self, head: bytes, sock: socket.socket) -> None:
        super().__init__()
        self._head, self._sock = memoryview(head), sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        if not self._head:
            return self._sock.recv_into(buffer)
        n = min(len(self._head), memoryview(buffer).nbytes)
        memoryview(buffer).cast("B")[:n] = self._head[:n]
        self._head = self._head[n:]
        return n


class _RequestHandler(WSGIRequestHandler):
    def __init__(
        self, conn: socket.socket, peer: tuple[str, int], server: Server, head: bytes
    ) -> None:
        self._head = head
        # wsgiref reads only base_environ and get_app() of its server.
        super().__init__(conn, peer, server)  # type: ignore[arg-type]

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        self.rfile = io.BufferedReader(_HeadFirst(self._head, self.connection))

    def handle(self) -> None:
        # wsgiref's own, with a handler that logs through logging. The event loop has
        # already refused request heads over 64 KiB.
        self.raw_requestline = self.rfile.readline(65537)
        if not self.parse_request():
            return
        handler = _ServerHandler(
            self.rfile,
            self.wfile,  # type: ignore[arg-type]  # typeshed: IO[bytes], wsgiref: any writer
            sys.stderr,
            self.get_environ(),
            multithread=True,
        )
        handler.request_handler = self
        handler.run(self.server.get_app())  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.client_address[0], format % args)


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
class _Waiting:
    """A connection in the event loop: handshaking, or reading its request head."""

    sock: socket.socket
    peer: tuple[str, int]
    deadline: float
    handshaken: bool
    head: bytes = b""


_HEAD_END = re.compile(rb"\r?\n\r?\n")
_MAX_HEAD = 65536


class Server:
    """A running server: ``address`` is the (host, port) bound, ``shutdown()`` stops it."""

    def __init__(
        self,
        listener: socket.socket,
        app: WSGIApplication,
        context: ssl.SSLContext | None,
        limits: Limits,
    ) -> None:
        host, port = listener.getsockname()[:2]
        self.address: tuple[str, int] = (host, port)
        self._app, self._context, self._limits = app, context, limits
        self._listener = listener
        listener.setblocking(False)
        self.base_environ = {
            "SERVER_NAME": host or "localhost",
            "SERVER_PORT": str(port),
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SCRIPT_NAME": "",
            "REMOTE_HOST": "",
            "CONTENT_LENGTH": "",
            **({"HTTPS": "on"} if context else {}),
        }
        self._selector = selectors.DefaultSelector()
        self._wake, self._waker = socket.socketpair()
        self._selector.register(listener, selectors.EVENT_READ)
        self._selector.register(self._wake, selectors.EVENT_READ)
        self._waiting: dict[socket.socket, _Waiting] = {}
        self._active: dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        self._ready: queue.Queue[_Waiting | None] = queue.Queue()
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._loop, name="web-loop", daemon=True)]
        self._threads += [
            threading.Thread(target=self._work, name=f"web-{i}", daemon=True)
            for i in range(limits.workers)
        ]
        for thread in self._threads:
            thread.start()

    def get_app(self) -> WSGIApplication:
        return self._app

    def shutdown(self) -> None:
        """Stop accepting, cut every connection and return within about a second."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        # Only a nudge: the loop also sees _stopping within its 0.25 s select timeout, so a
        # wake-up socket that is already gone must not keep shutdown from finishing.
        with contextlib.suppress(OSError):
            self._waker.send(b"\0")
        end = time.monotonic() + 1.0
        self._threads[0].join(1.0)
        while True:
            try:
                item = self._ready.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item.sock.close()
        with self._lock:
            for conn in self._active:
                _cut(conn)
        for _ in self._threads[1:]:
            self._ready.put(None)
        for thread in self._threads[1:]:
            thread.join(max(0.0, end - time.monotonic()))
        self._waker.close()

    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                for key, _ in self._selector.select(timeout=0.25):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.data is not None:
                        self._advance(key.data)
                self._expire(time.monotonic())
        finally:
            for waiting in list(self._waiting.values()):
                self._drop(waiting)
            self._selector.close()
            self._listener.close()
            self._wake.close()

    def _accept(self) -> None:
        for _ in range(64):  # then back to the loop, so that a flood cannot starve it
            try:
                conn, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # out of file descriptors: make room
                log.warning("cannot accept a connection: %s", err)
                if self._waiting:
                    self._drop(next(iter(self._waiting.values())))
                return
            if len(self._waiting) >= self._limits.waiting:
                self._drop(next(iter(self._waiting.values())))
            try:
                conn.setblocking(False)
                if self._context is not None:
                    conn = self._context.wrap_socket(
                        conn, server_side=True, do_handshake_on_connect=False
                    )
            except OSError as err:
                log.debug("%s: %s", peer[0], err)
                conn.close()
                continue
            deadline = time.monotonic() + self._limits.request_timeout
            waiting = _Waiting(conn, peer, deadline, handshaken=self._context is None)
            self._waiting[conn] = waiting
            self._selector.register(conn, selectors.EVENT_READ, waiting)

    def _advance(self, waiting: _Waiting) -> None:
        """Take the handshake and the request head as far as the bytes at hand allow."""
        events = selectors.EVENT_READ
        try:
            if isinstance(waiting.sock, ssl.SSLSocket) and not waiting.handshaken:
                waiting.sock.do_handshake()
                waiting.handshaken = True
            while not _HEAD_END.search(waiting.head):
                chunk = waiting.sock.recv(8192)
                if not chunk or len(waiting.head) + len(chunk) > _MAX_HEAD:
                    self._drop(waiting)
                    return
                waiting.head += chunk
        except (ssl.SSLWantReadError, BlockingIOError):
            pass
        except ssl.SSLWantWriteError:
            events = selectors.EVENT_WRITE
        except OSError as err:
            log.debug("%s: %s", waiting.peer[0], err)
            self._drop(waiting)
            return
        else:
            self._dispatch(waiting)
            return
        self._selector.modify(waiting.sock, events, waiting)

    def _drop(self, waiting: _Waiting) -> None:
        self._selector.unregister(waiting.sock)
        del self._waiting[waiting.sock]
        waiting.sock.close()

    def _dispatch(self, waiting: _Waiting) -> None:
        self._selector.unregister(waiting.sock)
        del self._waiting[waiting.sock]
        if self._ready.qsize() >= self._limits.queued:
            log.debug("%s: all workers busy, connection closed", waiting.peer[0])
            waiting.sock.close()
        else:
            self._ready.put(waiting)

    def _expire(self, now: float) -> None:
        for waiting in list(self._waiting.values()):
            if waiting.deadline > now:
                break  # oldest first: the rest are younger
            self._drop(waiting)
        with self._lock:
            for conn, deadline in self._active.items():
                if deadline <= now:
                    _cut(conn)

    def _work(self) -> None:
        while True:
            waiting = self._ready.get()
            if waiting is None:
                return
            self._serve(waiting)

    def _serve(self, waiting: _Waiting) -> None:
        conn = waiting.sock
        with self._lock:
            self._active[conn] = time.monotonic() + self._limits.deadline
        try:
            if not self._stopping.is_set():
                conn.settimeout(self._limits.read_timeout)
                _RequestHandler(conn, waiting.peer, self, waiting.head)
        except OSError as err:
            log.debug("%s: %s", waiting.peer[0], err)
        except Exception:
            log.exception("%s: request failed", waiting.peer[0])
        finally:
            with self._lock:
                del self._active[conn]
            conn.close()


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
) -> Server:
    """Serve ``app`` on ``listen_address`` with the TLS, basic auth and headers of ``settings``.

    Raises WebError if the address is bad or taken, ConfigError if a TLS file no longer loads.
    """
    context = None
    if settings is not None:
        app = guarded(app, settings)
        if settings.http.headers:
            app = _with_headers(app, settings.http.headers)
        if settings.tls is not None:
            context = ssl_context(settings.tls)
    return Server(_listen(listen_address), app, context, limits or Limits())
