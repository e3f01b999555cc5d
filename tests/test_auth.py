"""Basic auth under guessing, and rate_limit, on a real server over loopback."""

from __future__ import annotations

import base64
import http.client
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from kvm_exporter.auth import MAX_PASSWORD_BYTES
from kvm_exporter.web import Limits, Server, serve
from kvm_exporter.webconfig import load_web_config

PASSWORD = b"correct horse"


def hello(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``server(web_config_text)``: a server of ``hello`` behind that web config."""
    started: list[Server] = []

    def start(text: str, quick_app: bool = False) -> Server:
        path = tmp_path / f"web-{len(started)}.yml"
        path.write_text(text)
        settings = load_web_config(str(path))
        started.append(serve(hello, "127.0.0.1:0", settings, Limits(), quick_app=quick_app))
        return started[-1]

    yield start
    for s in started:
        s.shutdown()


def users(cost: int, password: bytes = PASSWORD, names: tuple[str, ...] = ("alice",)) -> str:
    hashed = bcrypt.hashpw(password[:MAX_PASSWORD_BYTES], bcrypt.gensalt(cost)).decode()
    return "basic_auth_users:\n" + "".join(f"  {name}: '{hashed}'\n" for name in names)


def get(
    server: Server, user: bytes | None = None, password: bytes = b"", source: str = "127.0.0.1"
) -> tuple[int, str]:
    """(status, Retry-After header) of one GET from ``source`` with basic auth as ``user``."""
    headers = {}
    if user is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(user + b":" + password).decode()
    conn = http.client.HTTPConnection(*server.address, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", "/metrics", headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader("Retry-After") or ""
    finally:
        conn.close()


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The hashes of every bcrypt check made, in order."""
    calls: list[bytes] = []
    real = bcrypt.checkpw

    def counted(password: bytes, hashed: bytes) -> bool:
        calls.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counted)
    return calls


def test_every_answer_is_remembered(server: Callable[..., Server], checks: list[bytes]) -> None:
    s = server(users(4))
    for user, password, status in [
        (b"alice", b"wrong", 401),
        (b"alice", b"wrong", 401),  # remembered: no second bcrypt
        (b"mallory", b"wrong", 401),
        (b"mallory", b"wrong", 401),
        (b"alice", PASSWORD, 200),
        (b"alice", PASSWORD, 200),
        (b"alice", b"other", 401),
    ]:
        assert get(s, user, password)[0] == status, (user, password)
    assert len(checks) == 4
    # The unknown user was checked against a decoy of alice's cost, not skipped.
    assert checks[1].startswith(b"$2b$04$") and checks[1] != checks[0]


def test_passwords_past_72_bytes_compare_on_their_first_72(
    server: Callable[..., Server],
) -> None:
    long = bytes(range(33, 33 + 90))  # 90 printable bytes
    s = server(users(4, long))
    assert get(s, b"alice", long)[0] == 200
    assert get(s, b"alice", long[:72] + b"another tail")[0] == 200
    assert get(s, b"alice", long[:71])[0] == 401
    assert get(s, b"alice", long[:71] + b"!")[0] == 401


def test_unknown_users_take_as_long_as_known_ones(server: Callable[..., Server]) -> None:
    s = server(users(9))  # about 30 ms a check: far above the HTTP round trip
    times: dict[bytes, list[float]] = {b"alice": [], b"nobody": []}
    for i in range(7):
        for user in times:
            began = time.perf_counter()
            assert get(s, user, f"guess {i}".encode())[0] == 401  # a new guess: a full check
            times[user].append(time.perf_counter() - began)
    known, unknown = (statistics.median(t) for t in times.values())
    assert 0.5 < unknown / known < 2.0, times  # without the decoy: under 0.1


def test_guesses_past_the_waiting_ones_are_told_to_retry(server: Callable[..., Server]) -> None:
    s = server(users(12))  # about 250 ms a check: the guesses below all overlap
    answers: list[tuple[int, str]] = []
    threads = [
        threading.Thread(target=lambda i=i: answers.append(get(s, b"alice", b"guess %d" % i)))
        for i in range(12)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    statuses = Counter(status for status, _ in answers)
    assert len(answers) == 12 and set(statuses) <= {401, 429}, answers
    assert statuses[401] >= 1 and statuses[429] >= 1, answers
    assert all(retry == "1" for status, retry in answers if status == 429)


@contextmanager
def guessing(s: Server, count: int) -> Iterator[Counter[int]]:
    """``count`` clients on 127.0.0.1 sending new wrong passwords back to back; their answers
    by status (0: connection failed) once the block ends."""
    stop = threading.Event()
    answers: Counter[int] = Counter()

    def guess(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                answers[get(s, b"alice", b"guess %d.%d" % (n, i))[0]] += 1
            except OSError:
                answers[0] += 1

    guessers = [threading.Thread(target=guess, args=(n,)) for n in range(count)]
    for t in guessers:
        t.start()
    try:
        time.sleep(0.5)
        yield answers
    finally:
        stop.set()
        for t in guessers:
            t.join(30)


def test_scrapes_are_answered_while_guessers_hammer(server: Callable[..., Server]) -> None:
    s = server(users(10))
    assert get(s, b"alice", PASSWORD)[0] == 200  # verified once, then remembered
    with guessing(s, 24) as answers:
        answered = [get(s, b"alice", PASSWORD)[0] for _ in range(20)]
    assert answered == [200] * 20
    assert answers[401] >= 1 and answers[429] >= 1, answers


def test_a_scraper_elsewhere_gets_a_turn_while_one_address_guesses(
    server: Callable[..., Server],
) -> None:
    names = ("alice", "bob", "carol")
    s = server(users(10, names=names))
    with guessing(s, 24) as answers:  # each user's first scrape: not yet remembered
        firsts = [get(s, name.encode(), PASSWORD, source="127.0.0.2")[0] for name in names]
    assert firsts == [200] * 3
    assert answers[401] >= 1 and answers[429] >= 1, answers


def test_rate_limit_answers_429_past_the_burst(server: Callable[..., Server]) -> None:
    s = server("rate_limit:\n  interval: 1h\n  burst: 2\n")
    assert [get(s)[0] for _ in range(4)] == [200, 200, 429, 429]


def test_rate_limit_comes_before_basic_auth(
    server: Callable[..., Server], checks: list[bytes]
) -> None:
    s = server(users(4) + "rate_limit: {interval: 1h, burst: 1}\n")
    assert get(s, b"alice", b"wrong")[0] == 401
    assert get(s, b"alice", b"other")[0] == 429
    assert len(checks) == 1  # the refused request cost no bcrypt


def test_a_request_the_loop_hands_to_a_worker_takes_one_token(
    server: Callable[..., Server], checks: list[bytes]
) -> None:
    """New credentials need bcrypt, so the event loop hands the request to a worker, which
    runs the rate limit again: the loop's try gives its token back."""
    s = server(users(4) + "rate_limit: {interval: 1h, burst: 1}\n", quick_app=True)
    assert get(s, b"alice", PASSWORD)[0] == 200
    assert get(s, b"alice", PASSWORD)[0] == 429
    assert len(checks) == 1


def test_rate_limit_refills_one_request_per_interval(server: Callable[..., Server]) -> None:
    s = server("rate_limit: {interval: 2s, burst: 1}\n")
    assert get(s)[0] == 200
    assert get(s)[0] == 429
    time.sleep(2.1)
    assert get(s)[0] == 200


def test_zero_interval_means_no_limit(server: Callable[..., Server]) -> None:
    s = server("rate_limit: {interval: 0, burst: 0}\n")
    assert [get(s)[0] for _ in range(5)] == [200] * 5
