"""The HTTP(S) server on real loopback sockets with real certificates made by the tests."""

from __future__ import annotations

import base64
import contextlib
import gzip
import http.client
import logging
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import tlsutil
from attack_support import PARTIAL_HEAD, Crowd, client_hello
from conftest import samples
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from kvm_exporter.quick import refuse_to_block
from kvm_exporter.web import Limits, Server, WebError, parse_listen_address, serve
from kvm_exporter.webconfig import WebSettings, load_web_config

PASSWORD = "correct horse"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()


def hello(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Frame-Options", "allow")])
    return [f"{environ['wsgi.url_scheme']} {environ['PATH_INFO']}".encode()]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tlsutil.write_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.shutdown()


def start(
    servers: list[Server], settings: WebSettings | None = None, app: Any = hello, **limits: Any
) -> Server:
    server = serve(app, "127.0.0.1:0", settings, Limits(**limits))
    servers.append(server)
    return server


def settings(pki: Path, text: str) -> WebSettings:
    path = pki / f"web-{time.monotonic_ns()}.yml"
    path.write_text(text)
    return load_web_config(str(path))


def tls_settings(pki: Path, extra: str = "") -> WebSettings:
    return settings(
        pki, f"tls_server_config:\n  cert_file: server.pem\n  key_file: server-key.pem\n{extra}"
    )


def client_context(pki: Path, ca: str = "ca.pem", cert: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / ca))
    if cert:
        context.load_cert_chain(str(pki / f"{cert}.pem"), str(pki / f"{cert}-key.pem"))
    return context


def get(
    server: Server,
    path: str = "/metrics",
    context: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5,
) -> tuple[int, dict[str, str], bytes]:
    host, port = server.address
    conn: http.client.HTTPConnection
    if context is None:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    else:
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes ``sock`` within ``within`` seconds."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# --- plain HTTP, addresses -------------------------------------------------------------------


def test_plain_http_serves_the_app(servers: list[Server], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="kvm_exporter.web")
    server = start(servers)
    assert server.address[0] == "127.0.0.1" and server.address[1] > 0
    status, headers, body = get(server, "/metrics?x=1")
    assert (status, body) == (200, b"http /metrics")
    assert headers["Content-Type"] == "text/plain"
    deadline = time.monotonic() + 2  # the worker logs after the client has its response
    while "GET /metrics" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.01)
    assert '127.0.0.1 "GET /metrics?x=1 HTTP/1.1" 200' in caplog.text
    assert all(r.levelno == logging.DEBUG for r in caplog.records)


def test_taken_port_is_a_one_line_error(servers: list[Server]) -> None:
    port = start(servers).address[1]
    with pytest.raises(WebError) as caught:
        serve(hello, f"127.0.0.1:{port}", None)
    assert str(caught.value) == f"cannot listen on 127.0.0.1:{port}: address already in use"


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("9429", "expected host:port such as :9429, 127.0.0.1:9429 or [::1]:9429"),
        ("127.0.0.1:", "expected host:port"),
        ("127.0.0.1:65536", "expected host:port"),
        ("127.0.0.1:http", "expected host:port"),
        ("::1:9429", "expected host:port"),
        ("[::1:9429", "expected host:port"),
        ("no-such-host.invalid:0", "name or service not known"),
        ("192.0.2.1:0", "cannot assign requested address"),
    ],
)
def test_bad_address_is_a_one_line_error(address: str, reason: str) -> None:
    with pytest.raises(WebError) as caught:
        serve(hello, address, None)
    assert str(caught.value).startswith(f"cannot listen on {address}: {reason}")


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (":9429", ("", 9429)),
        ("0.0.0.0:9429", ("0.0.0.0", 9429)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::1]:9429", ("::1", 9429)),
        ("localhost:9429", ("localhost", 9429)),
    ],
)
def test_listen_address_forms(address: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(address) == expected


def test_localhost_and_ipv6_loopback(servers: list[Server]) -> None:
    for address, host in (("localhost:0", "127.0.0.1"), ("[::1]:0", "::1")):
        server = serve(hello, address, None)
        servers.append(server)
        assert server.address[0] == host
        assert get(server)[0] == 200


# --- TLS ---------------------------------------------------------------------------------------


def test_tls_good_client(pki: Path, servers: list[Server]) -> None:
    server = start(servers, tls_settings(pki))
    status, _, body = get(server, "/x", client_context(pki))
    assert (status, body) == (200, b"https /x")


def test_tls_client_with_wrong_ca_fails_the_handshake(pki: Path, servers: list[Server]) -> None:
    server = start(servers, tls_settings(pki))
    with pytest.raises(ssl.SSLCertVerificationError):
        get(server, context=client_context(pki, ca="other-ca.pem"))


def test_plain_http_to_tls_server_gets_400_saying_so(pki: Path, servers: list[Server]) -> None:
    server = start(servers, tls_settings(pki))
    status, _, body = get(server)
    assert (status, body) == (400, b"Client sent an HTTP request to an HTTPS server.\n")
    assert get(server, context=client_context(pki))[0] == 200


MTLS = "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\n"


def test_client_cert_required_and_missing(pki: Path, servers: list[Server]) -> None:
    server = start(servers, tls_settings(pki, MTLS))
    # In TLS 1.3 the server's refusal reaches the client after its side of the handshake.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        get(server, context=client_context(pki))


def test_client_cert_required_and_given(pki: Path, servers: list[Server]) -> None:
    server = start(servers, tls_settings(pki, MTLS))
    assert get(server, context=client_context(pki, cert="client"))[0] == 200


def test_client_cert_from_another_ca_is_refused(pki: Path, servers: list[Server]) -> None:
    server = start(servers, tls_settings(pki, MTLS))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        get(server, context=client_context(pki, cert="other-client"))


def test_client_cert_optional(pki: Path, servers: list[Server]) -> None:
    extra = "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: ca.pem\n"
    server = start(servers, tls_settings(pki, extra))
    assert get(server, context=client_context(pki))[0] == 200
    assert get(server, context=client_context(pki, cert="client"))[0] == 200
    with pytest.raises((ssl.SSLError, ConnectionError)):
        get(server, context=client_context(pki, cert="other-client"))


def test_tls_min_version_is_enforced(pki: Path, servers: list[Server]) -> None:
    server = start(servers, tls_settings(pki, "  min_version: TLS13\n"))
    old = client_context(pki)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError, match="VERSION|version"):
        get(server, context=old)
    assert get(server, context=client_context(pki))[0] == 200


def test_tls_max_version_and_cipher_suites(pki: Path, servers: list[Server]) -> None:
    extra = "  max_version: TLS12\n  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384]\n"
    server = start(servers, tls_settings(pki, extra))
    context = client_context(pki)
    raw = socket.create_connection(server.address, timeout=5)
    with context.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.version() == "TLSv1.2"
        assert tls.cipher() == ("ECDHE-ECDSA-AES256-GCM-SHA384", "TLSv1.2", 256)


# --- basic auth and headers --------------------------------------------------------------------


def auth_settings(pki: Path, extra: str = "") -> WebSettings:
    hashes = f"  alice: {HASH}\n  bob: '{HASH.replace('$2b$', '$2y$')}'\n"
    return settings(pki, f"basic_auth_users:\n{hashes}{extra}")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        basic("alice", "wrong"),
        basic("mallory", PASSWORD),
        basic("alice", PASSWORD + "x" * 80),
        {"Authorization": "Bearer abc"},
        {"Authorization": "Basic !!!"},
        {"Authorization": "Basic " + base64.b64encode(b"alice").decode()},
    ],
)
def test_basic_auth_refuses(pki: Path, servers: list[Server], headers: dict[str, str]) -> None:
    server = start(servers, auth_settings(pki))
    status, response_headers, body = get(server, headers=headers)
    assert (status, body) == (401, b"Unauthorized\n")
    assert response_headers["WWW-Authenticate"] == 'Basic realm="kvm_exporter"'


def test_basic_auth_admits_and_remembers(
    pki: Path, servers: list[Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls, real_checkpw = [], bcrypt.checkpw

    def checkpw(password: bytes, hashed: bytes) -> bool:
        calls.append(hashed)
        return real_checkpw(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", checkpw)
    server = start(servers, auth_settings(pki))
    for user in ("alice", "bob", "alice", "bob"):
        status, _, body = get(server, headers=basic(user, PASSWORD))
        assert (status, body) == (200, b"http /metrics")
    assert len(calls) == 2
    assert get(server, headers=basic("alice", "wrong"))[0] == 401
    assert get(server, headers=basic("alice", "wrong"))[0] == 401
    assert len(calls) == 3  # the repeated wrong guess is remembered too


def test_configured_headers_on_every_response(pki: Path, servers: list[Server]) -> None:
    extra = (
        "http_server_config:\n  headers:\n    X-Frame-Options: deny\n"
        "    X-Content-Type-Options: nosniff\n"
    )
    server = start(servers, auth_settings(pki, extra))
    for credentials, status in ((basic("alice", PASSWORD), 200), ({}, 401)):
        response = get(server, headers=credentials)
        assert response[0] == status
        assert response[1]["X-Frame-Options"] == "deny"
        assert response[1]["X-Content-Type-Options"] == "nosniff"


# --- robustness --------------------------------------------------------------------------------


def timed_scrapes(server: Server, context: ssl.SSLContext, count: int) -> list[float]:
    times = []
    for _ in range(count):
        began = time.perf_counter()
        status, _, body = get(server, context=context)
        times.append(time.perf_counter() - began)
        assert (status, body) == (200, b"https /metrics")
    return times


def test_idle_connections_do_not_delay_tls_scrapes(pki: Path, servers: list[Server]) -> None:
    server = start(servers, tls_settings(pki))
    context = client_context(pki)
    baseline = timed_scrapes(server, context, 20)
    idle = [socket.create_connection(server.address, timeout=5) for _ in range(20)]
    # Half of them also start a handshake they never finish: a partial ClientHello.
    for sock in idle[10:]:
        sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01")
    try:
        loaded = timed_scrapes(server, context, 20)
        print(
            f"\nTLS scrape seconds, baseline max {max(baseline):.4f} median "
            f"{sorted(baseline)[10]:.4f}; with 20 idle connections max {max(loaded):.4f} "
            f"median {sorted(loaded)[10]:.4f}"
        )
        assert max(loaded) < max(baseline) * 5 + 0.5
        assert not any(closed_by_server(sock, 0.01) for sock in idle)
    finally:
        for sock in idle:
            sock.close()


def test_thread_count_is_bounded(servers: list[Server]) -> None:
    lock, running, most = threading.Lock(), [0], [0]

    def slow(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        start_response("200 OK", [])
        return [b"ok"]

    before = threading.active_count()
    server = start(servers, app=slow, workers=2)
    assert threading.active_count() == before + 3
    results: list[int] = []
    clients = [threading.Thread(target=lambda: results.append(get(server)[0])) for _ in range(8)]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    assert results == [200] * 8
    assert most[0] == 2


def test_silent_connection_is_closed_after_request_timeout(servers: list[Server]) -> None:
    server = start(servers, request_timeout=0.3)
    with socket.create_connection(server.address) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # the head never ends
        assert closed_by_server(sock, 2.0)


def test_waiting_connections_are_capped_oldest_first(servers: list[Server]) -> None:
    server = start(servers, connections=3)
    socks = [socket.create_connection(server.address) for _ in range(5)]
    try:
        for sock in socks:
            sock.sendall(PARTIAL_HEAD)
            time.sleep(0.05)  # accepted in this order
        time.sleep(0.3)
        assert [closed_by_server(sock, 0.2) for sock in socks] == [True, True, False, False, False]
        assert get(server)[0] == 200
    finally:
        for sock in socks:
            sock.close()


def ended_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server ends ``sock`` within ``within`` seconds, whatever it sent before."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def test_silent_clients_reconnecting_cannot_delay_a_new_scrape(servers: list[Server]) -> None:
    """100 clients that connect, send nothing and reconnect as soon as they are closed,
    against 8 connections and 10 evictions a second: every scrape on a new connection is
    answered, across the moment the kernel hands the silent ones over (DEFER_ACCEPT, 3 s).
    Before, each scrape queued behind ~90 silent clients at 10 a second."""
    server = start(servers, connections=8, evictions=10)
    statuses = []
    with Crowd(server.address[1], 100) as crowd:
        for _ in range(12):
            statuses.append(get(server, timeout=3)[0])
            time.sleep(0.4)
    assert statuses == [200] * 12
    assert crowd.connects >= 100


def test_a_client_silent_past_defer_accept_goes_before_one_that_spoke(
    servers: list[Server],
) -> None:
    """When the server is full, a connection that the kernel hands over silent is closed,
    not the oldest connection that sent part of its request."""
    server = start(servers, connections=2, evictions=1000)
    spoke = [socket.create_connection(server.address) for _ in range(2)]
    for sock in spoke:
        sock.sendall(PARTIAL_HEAD)
    with socket.create_connection(server.address) as silent:
        assert ended_by_server(silent, 6.0)  # handed over after DEFER_ACCEPT, then closed
        assert not any(ended_by_server(sock, 0.1) for sock in spoke)
    for sock in spoke:
        sock.close()


class StalledClient:
    """A real TLS client that sends its ClientHello and stops there until :meth:`resume`."""

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext) -> None:
        self.sock = socket.create_connection(address)
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_hostname="localhost")
        with contextlib.suppress(ssl.SSLWantReadError):
            self._tls.do_handshake()
        self.sock.sendall(self._out.read())

    def resume(self, within: float) -> bytes | None:
        """Finish the handshake, send a request and return the first bytes of the answer;
        b"" if the server sends nothing more within ``within`` seconds, None if it closes."""
        self.sock.settimeout(within)
        try:
            self._until(self._tls.do_handshake)
            self._tls.write(b"GET /resumed HTTP/1.1\r\nHost: x\r\n\r\n")
            self.sock.sendall(self._out.read())
            return self._until(lambda: self._tls.read(65536))
        except TimeoutError:
            return b""
        except (ConnectionResetError, EOFError):
            return None

    def _until(self, step: Callable[[], Any]) -> Any:
        """``step`` once the server has sent what it needs."""
        while True:
            try:
                return step()
            except ssl.SSLWantReadError:
                self.sock.sendall(self._out.read())
                data = self.sock.recv(65536)
                if not data:
                    raise EOFError from None
                self._in.write(data)


def test_stalled_handshakes_past_the_cap_drop_the_oldest_unseen(
    pki: Path, servers: list[Server]
) -> None:
    """With 3 handshakes allowed in flight, 5 clients that stall after their ClientHello and
    then a real scrape: the real scrape is answered; the 3 oldest stalled handshakes were
    dropped (their TLS state freed) without the clients being told, so none is closed; when
    all 5 go on, the 2 newest are answered and the 3 dropped ones never are."""
    server = start(servers, tls_settings(pki), handshakes=3, handshake_grace=0.0)
    context = client_context(pki)
    stalled = []
    try:
        for _ in range(5):
            stalled.append(StalledClient(server.address, context))
            time.sleep(0.05)  # begun in this order
        assert get(server, context=context)[:3:2] == (200, b"https /metrics")
        answers = [client.resume(1.0) for client in stalled]
        assert [a if a is None else a[:15] for a in answers] == [
            *[b""] * 3,  # never answered, never closed
            *[b"HTTP/1.1 200 OK"] * 2,
        ]
    finally:
        for client in stalled:
            client.sock.close()


def test_a_tls_scrape_succeeds_during_a_stalled_handshake_flood(
    pki: Path, servers: list[Server]
) -> None:
    """200 clients stalling after their ClientHello, against 16 handshakes in flight: every
    real TLS scrape is answered, and no stalled client is closed (so none reconnects to
    cost the server another key exchange)."""
    server = start(servers, tls_settings(pki), handshakes=16)
    context = client_context(pki)
    statuses = []
    with Crowd(server.address[1], 200, opening=client_hello()) as crowd:
        time.sleep(0.5)
        for _ in range(12):
            statuses.append(get(server, context=context, timeout=3)[0])
            time.sleep(0.1)
    assert statuses == [200] * 12
    assert crowd.connects == 200


def test_slow_reader_is_cut_at_the_deadline(servers: list[Server]) -> None:
    def large(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [])
        return [b"x" * 65536] * 1000

    server = start(servers, app=large, deadline=0.5)
    with socket.create_connection(server.address) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        time.sleep(1.0)  # read nothing: the worker blocks on full socket buffers
        sock.settimeout(2.0)
        began = time.perf_counter()
        received = 0
        while chunk := sock.recv(65536):
            received += len(chunk)
        assert 0 < received < 65536 * 1000
        assert time.perf_counter() - began < 2


def test_failing_app_gives_500_and_logs(
    servers: list[Server], caplog: pytest.LogCaptureFixture
) -> None:
    def broken(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        raise RuntimeError("boom")

    server = start(servers, app=broken)
    assert get(server)[0] == 500
    [failed] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert failed.name == "kvm_exporter.web"
    assert failed.getMessage().startswith("127.0.0.1: GET /metrics HTTP/1.1 failed: Traceback")
    assert failed.getMessage().endswith("RuntimeError: boom")
    assert get(server)[0] == 500  # the worker survived


def test_shutdown_is_quick_and_closes_everything(pki: Path) -> None:
    started = threading.Event()

    def stuck(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [])
        yield b"partial"
        started.set()
        time.sleep(5)  # the worker is busy until shutdown cuts its connection

    server = serve(stuck, "127.0.0.1:0", tls_settings(pki))
    idle = socket.create_connection(server.address)
    idle.sendall(client_hello()[:8])  # a handshake begun, never ended
    busy = client_context(pki).wrap_socket(
        socket.create_connection(server.address), server_hostname="localhost"
    )
    busy.sendall(b"GET / HTTP/1.0\r\n\r\n")
    assert started.wait(5)
    began = time.perf_counter()
    server.shutdown()
    took = time.perf_counter() - began
    assert took < 1.5
    assert closed_by_server(idle, 1.0)
    busy.settimeout(1.0)
    response = b"".join(iter(lambda: busy.recv(65536), b""))
    assert response.startswith(b"HTTP/1.0 200 OK") and response.endswith(b"\r\n\r\npartial")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(server.address, timeout=1)
    idle.close()
    busy.close()
    server.shutdown()  # a second call is harmless


# --- HTTP/1.1: keep-alive, HEAD, framing (issue 11) ---------------------------------------------


def test_keep_alive_serves_several_requests_on_one_connection(servers: list[Server]) -> None:
    server = start(servers)
    conn = http.client.HTTPConnection(*server.address, timeout=5)
    try:
        for path in ("/a", "/b", "/c"):
            conn.request("GET", path)
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, f"http {path}".encode())
            assert response.getheader("Connection") is None and not response.will_close
            if path == "/a":
                first = conn.sock
            assert conn.sock is first
        conn.request("GET", "/d", headers={"Connection": "close"})
        response = conn.getresponse()
        assert response.getheader("Connection") == "close" and response.read() == b"http /d"
    finally:
        conn.close()


def test_pipelined_requests_are_answered_in_order(servers: list[Server]) -> None:
    server = start(servers)
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.sendall(b"GET /3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = b"".join(iter(lambda: sock.recv(65536), b""))
    assert received.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert received.index(b"http /1") < received.index(b"http /2") < received.index(b"http /3")


def test_idle_keep_alive_connection_is_closed_after_idle_timeout(servers: list[Server]) -> None:
    server = start(servers, idle_timeout=0.3)
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
        assert not closed_by_server(sock, 0.1)
        assert closed_by_server(sock, 2.0)


def test_http10_closes_unless_keep_alive_is_asked(servers: list[Server]) -> None:
    server = start(servers)
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        answer = sock.recv(65536)
        assert (
            answer.startswith(b"HTTP/1.0 200 OK\r\n")
            and b"\r\nConnection: keep-alive\r\n" in answer
        )
        sock.sendall(b"GET /y HTTP/1.0\r\n\r\n")
        rest = b"".join(iter(lambda: sock.recv(65536), b""))
        assert rest.startswith(b"HTTP/1.0 200 OK\r\n") and rest.endswith(b"http /y")


def test_head_has_the_get_headers_and_no_body(servers: list[Server]) -> None:
    server = start(servers)
    conn = http.client.HTTPConnection(*server.address, timeout=5)
    try:
        conn.request("HEAD", "/metrics")
        response = conn.getresponse()
        assert response.status == 200 and response.read() == b""
        assert response.getheader("Content-Length") == str(len(b"http /metrics"))
        conn.request("GET", "/metrics")  # the connection is still in step
        assert conn.getresponse().read() == b"http /metrics"
    finally:
        conn.close()


def test_no_server_header_and_a_date(servers: list[Server]) -> None:
    _, headers, _ = get(start(servers))
    assert "Server" not in headers and headers["Date"].endswith(" GMT")


def test_streamed_body_is_chunked_for_http11_and_close_delimited_for_http10(
    servers: list[Server],
) -> None:
    def stream(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"one "
        yield b""
        yield b"two"

    server = start(servers, app=stream)
    status, headers, body = get(server)
    assert (status, headers["Transfer-Encoding"], body) == (200, "chunked", b"one two")
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    assert b"Content-Length" not in answer and answer.endswith(b"\r\n\r\none two")


def test_a_request_with_a_body_is_answered_then_closed(servers: list[Server]) -> None:
    server = start(servers)
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nGET /")
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    assert answer.count(b"HTTP/1.1") == 1 and b"\r\nConnection: close\r\n" in answer


def test_a_client_scraping_back_to_back_waits_behind_others(servers: list[Server]) -> None:
    """With the only worker busy, a request sent right after the same connection's previous
    response waits until a new client's request is served, although it came first."""
    release, order = threading.Event(), []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/block":
            release.wait(5)
        order.append(environ["PATH_INFO"])
        start_response("200 OK", [])
        return [b"ok"]

    server = start(servers, app=app, workers=1)
    hasty, blocker, fresh = (socket.create_connection(server.address, timeout=5) for _ in "abc")
    try:
        hasty.sendall(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        assert hasty.recv(65536).startswith(b"HTTP/1.1 200 OK")
        blocker.sendall(b"GET /block HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.05)
        hasty.sendall(b"GET /hasty HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.05)
        fresh.sendall(b"GET /fresh HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.05)
        release.set()
        for sock in (blocker, fresh, hasty):
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")
        assert order == ["/first", "/block", "/fresh", "/hasty"]
    finally:
        for sock in (hasty, blocker, fresh):
            sock.close()


# --- the exporter's /metrics: filters, HEAD, the request counter (issue 11) --------------------


def test_exporter_name_filters_head_and_request_counter(exporter: Any) -> None:
    running = exporter()
    text = running.get("/metrics?name[]=kvm_up&name[]=kvm_polls")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(families) == {"kvm_up", "kvm_polls"}
    assert [s.name for s in families["kvm_polls"].samples] == ["kvm_polls_total"]
    only_sample = running.get("/metrics?name%5B%5D=kvm_polls_total")
    assert [f.name for f in text_string_to_metric_families(only_sample)] == ["kvm_polls"]
    with pytest.raises(urllib.error.HTTPError) as refused:
        running.get("/metrics?name[]=no_such_metric")
    assert refused.value.code == 400
    head = urllib.request.urlopen(urllib.request.Request(running.url + "/metrics", method="HEAD"))
    assert head.status == 200 and head.read() == b"" and int(head.headers["Content-Length"]) > 0
    counted = samples(running.get())
    codes = {dict(labels)["code"]: value for (name, labels), value in counted.items()
             if name == "promhttp_metric_handler_requests_total"}  # fmt: skip
    assert codes == {"200": 3.0, "400": 1.0, "500": 0.0, "503": 0.0}  # before this one
    again = samples(running.get())
    key = ("promhttp_metric_handler_requests_total", frozenset({("code", "200")}))
    assert again[key] == 4.0


@pytest.mark.parametrize("gzipped", [False, True])
def test_exporter_openmetrics_with_the_live_counter_is_one_valid_exposition(
    exporter: Any, gzipped: bool
) -> None:
    running = exporter()
    headers = {"Accept": "application/openmetrics-text; version=1.0.0"}
    if gzipped:
        headers["Accept-Encoding"] = "gzip"
    for _ in range(2):  # the second comes from the cache, the counter rendered anew
        request = urllib.request.Request(running.url + "/metrics", headers=headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
            assert (response.headers.get("Content-Encoding") == "gzip") == gzipped
        text = (gzip.decompress(body) if gzipped else body).decode()
        assert text.endswith("\n# EOF\n") and text.count("# EOF") == 1
        names = {f.name for f in openmetrics_families(text)}
        assert {"kvm_up", "promhttp_metric_handler_requests"} <= names


SHARED_FDS = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_NOFILE, (320, 320))
from kvm_exporter.web import serve
app = lambda environ, start_response: []
servers = [serve(app, "127.0.0.1:0", None) for _ in range(2)]
print(*(s.address[1] for s in servers), flush=True)
sys.stdin.read()
"""


def test_servers_of_one_process_share_the_descriptors() -> None:
    """Two servers (two listen addresses) under 320 descriptors hold 256 connections in all,
    not 256 each."""
    child = subprocess.Popen(
        [sys.executable, "-c", SHARED_FDS],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd="/",
    )
    assert child.stdout is not None and child.stdin is not None
    try:
        ports = [int(port) for port in child.stdout.readline().split()]
        clients = [socket.create_connection(("127.0.0.1", p)) for p in ports for _ in range(150)]
        for sock in clients:
            sock.sendall(PARTIAL_HEAD)
        time.sleep(1)
        assert sum(not closed_by_server(sock, 0.01) for sock in clients) == 256
    finally:
        child.stdin.close()
        child.wait(10)
        for sock in clients:
            sock.close()


# --- answers from the event loop (issue 23: scrapes that wait for no worker) -----------------


def quick(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """An app as :mod:`kvm_exporter.quick` asks: ``/slow`` would block (so a worker runs it,
    until ``released``), ``/big`` is 8 MiB; otherwise the answering thread's name."""
    path = environ["PATH_INFO"]
    if path == "/slow":
        refuse_to_block()
        entered.set()
        released.wait(30)
        body = b"slow"
    elif path == "/big":
        body = b"x" * (8 << 20)
    else:
        body = threading.current_thread().name.encode()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]


entered, released = threading.Event(), threading.Event()


@pytest.fixture
def quick_server(servers: list[Server]) -> Iterator[Server]:
    entered.clear()
    released.clear()
    server = serve(quick, "127.0.0.1:0", None, Limits(workers=1), quick_app=True)
    servers.append(server)
    yield server
    released.set()


def test_the_loop_answers_what_needs_no_worker_while_every_worker_waits(
    quick_server: Server,
) -> None:
    slow: list[tuple[int, dict[str, str], bytes]] = []
    waiting = threading.Thread(target=lambda: slow.append(get(quick_server, "/slow", timeout=30)))
    waiting.start()
    assert entered.wait(10), "the request that would block never reached the worker"
    status, _, body = get(quick_server, "/fast")
    assert (status, body) == (200, b"web-loop")
    assert not slow  # the only worker is still held
    released.set()
    waiting.join(10)
    assert slow[0][0] == 200 and slow[0][2] == b"slow"


def test_what_the_loop_cannot_send_at_once_a_worker_sends_whole(quick_server: Server) -> None:
    status, _, body = get(quick_server, "/big", timeout=30)
    assert status == 200 and body == b"x" * (8 << 20)


def _next_response(file: Any) -> tuple[bytes, bytes]:
    """The status line and body of the next response on ``file`` (with a Content-Length)."""
    status, length = file.readline().rstrip(), 0
    while (line := file.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    return status, file.read(length)


def test_requests_sent_together_are_answered_in_order_on_the_kept_connection(
    quick_server: Server,
) -> None:
    two = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /big HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(quick_server.address, timeout=30) as sock:
        sock.sendall(two)
        file = sock.makefile("rb")
        assert _next_response(file) == (b"HTTP/1.1 200 OK", b"web-loop")
        assert _next_response(file) == (b"HTTP/1.1 200 OK", b"x" * (8 << 20))
        sock.sendall(b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n")  # still kept alive
        assert _next_response(file) == (b"HTTP/1.1 200 OK", b"web-loop")


def test_requests_sent_together_wait_for_no_tick_of_the_loop(quick_server: Server) -> None:
    """Each pipelined request after the first two is read from the connection's buffer, not
    the socket: the loop must not sit in select() (a 0.25 s tick each) while one waits."""
    selector, waited = quick_server._selector, []
    select = selector.select

    def watched(timeout: float | None = None) -> Any:
        waited.append(bool(quick_server._pipelined) and timeout != 0)
        return select(timeout)

    selector.select = watched  # type: ignore[method-assign]
    five = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n" * 5
    with socket.create_connection(quick_server.address, timeout=30) as sock:
        sock.sendall(five)
        file = sock.makefile("rb")
        for _ in range(5):
            assert _next_response(file) == (b"HTTP/1.1 200 OK", b"web-loop")
    assert not any(waited), f"{waited.count(True)} ticks waited with requests read already"
