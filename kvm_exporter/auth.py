"""Basic auth and exporter-toolkit's ``rate_limit`` in front of the WSGI app.

bcrypt is slow on purpose (about 65 ms of CPU at cost 10), so guessing must cost the guesser,
not the scrapes: every check's answer, right or wrong, is remembered (a repeated guess costs no
bcrypt), at most one bcrypt runs at a time with three more waiting briefly, one per client
address (the rest are told 429 at once instead of holding a worker thread), and unknown
users are checked against a decoy hash of the same cost, so the time of an answer does not
tell whether a user exists.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import bcrypt

from .quick import WouldBlock, refuse_to_block
from .webconfig import RateLimit, WebSettings

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

REALM = "kvm_exporter"
MAX_PASSWORD_BYTES = 72
"""bcrypt reads this many bytes of a password; like Go's bcrypt, the rest is ignored."""


class _Memory:
    """A bounded, thread-safe set that forgets its least recently used keys."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._keys: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            if key not in self._keys:
                return False
            self._keys.move_to_end(key)
            return True

    def add(self, key: bytes) -> None:
        with self._lock:
            self._keys[key] = None
            self._keys.move_to_end(key)
            if len(self._keys) > self._size:
                self._keys.popitem(last=False)


class _Turns:
    """Turns at bcrypt: ``running`` clients at once and ``waiting`` more waiting up to ``wait``
    seconds in order, at most one place per client address; anyone else is refused at once. A
    guesser with a hundred connections holds one place, so a scraper elsewhere gets a turn:
    a finished turn is handed to the longest waiter, never to a newcomer."""

    def __init__(self, running: int, waiting: int, wait: float) -> None:
        self._free, self._places, self._wait = running, running + waiting, wait
        self._queue: deque[threading.Event] = deque()
        self._holders: set[str] = set()
        self._lock = threading.Lock()

    @contextmanager
    def turn(self, client: str) -> Iterator[bool]:
        """Yields whether ``client`` (an address) got a turn."""
        called: threading.Event | None = None
        with self._lock:
            placed = client not in self._holders and len(self._holders) < self._places
            if placed:
                self._holders.add(client)
                if self._free:
                    self._free -= 1
                else:
                    called = threading.Event()
                    self._queue.append(called)
        if not placed:
            yield False
            return
        try:
            if called is not None and not called.wait(self._wait) and not self._give_up(called):
                yield False
                return
            try:
                yield True
            finally:
                self._pass_on()
        finally:
            with self._lock:
                self._holders.discard(client)

    def _give_up(self, called: threading.Event) -> bool:
        """Leave the queue and return False, or True if the turn came as the wait ended."""
        with self._lock:
            if called.is_set():
                return True
            self._queue.remove(called)
            return False

    def _pass_on(self) -> None:
        with self._lock:
            if self._queue:
                self._queue.popleft().set()
            else:
                self._free += 1


def _reply(
    start_response: StartResponse, status: str, headers: list[tuple[str, str]]
) -> list[bytes]:
    body = status.partition(" ")[2].encode() + b"\n"
    start_response(
        status,
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
        + headers,
    )
    return [body]


class BasicAuth:
    """WSGI middleware admitting the users of ``basic_auth_users`` (see the module's notes)."""

    def __init__(self, app: WSGIApplication, users: tuple[tuple[str, str], ...]) -> None:
        self._app = app
        self._users = {user: hashed.encode() for user, hashed in users}
        costs = [hashed[:7] for _, hashed in users]
        # A valid hash (an all-zero salt and digest) of the users' most common cost.
        self._decoy = max(costs, key=costs.count).encode() + b"." * 53
        self._key = secrets.token_bytes(32)  # the memories hold keyed digests, not passwords
        self._admitted = _Memory(64)
        self._refused = _Memory(4096)
        self._turns = _Turns(running=1, waiting=3, wait=1.0)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        verdict = self._verdict(environ.get("HTTP_AUTHORIZATION", ""), environ["REMOTE_ADDR"])
        if verdict:
            return self._app(environ, start_response)
        if verdict is None:
            return _reply(start_response, "429 Too Many Requests", [("Retry-After", "1")])
        challenge = ("WWW-Authenticate", f'Basic realm="{REALM}"')
        return _reply(start_response, "401 Unauthorized", [challenge])

    def _verdict(self, header: str, client: str) -> bool | None:
        """Whether the credentials in ``header`` are right; None if no bcrypt turn was free."""
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
            user_bytes, sep, password = decoded.partition(b":")
            user = user_bytes.decode("utf-8")
        except ValueError:
            return False
        if not sep:
            return False
        password = password[:MAX_PASSWORD_BYTES]
        key = hashlib.blake2b(
            len(user_bytes).to_bytes(4, "big") + user_bytes + password, key=self._key
        ).digest()
        if key in self._admitted:
            return True
        if key in self._refused:
            return False
        hashed = self._users.get(user)
        refuse_to_block()  # bcrypt
        with self._turns.turn(client) as mine:
            if not mine:
                return None
            ok = bcrypt.checkpw(password, hashed or self._decoy) and hashed is not None
        (self._admitted if ok else self._refused).add(key)
        return ok


class RateLimited:
    """WSGI middleware: a token bucket of ``burst`` requests refilled one per ``interval``
    seconds over every request, as exporter-toolkit's ``rate_limit``; past it, 429."""

    def __init__(self, app: WSGIApplication, limit: RateLimit) -> None:
        self._app, self._interval, self._burst = app, limit.interval, float(limit.burst)
        self._tokens, self._last = self._burst, time.monotonic()
        self._lock = threading.Lock()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._last) / self._interval)
            self._last = now
            allowed = self._tokens >= 1
            if allowed:
                self._tokens -= 1
        if not allowed:
            return _reply(start_response, "429 Too Many Requests", [])
        try:
            return self._app(environ, start_response)
        except WouldBlock:  # a worker asks again: this one does not count
            with self._lock:
                self._tokens += 1
            raise


def guarded(app: WSGIApplication, settings: WebSettings) -> WSGIApplication:
    """``app`` behind the rate limit and basic auth of ``settings`` (each if configured)."""
    if settings.basic_auth_users:
        app = BasicAuth(app, settings.basic_auth_users)
    if settings.rate_limit.interval > 0:
        app = RateLimited(app, settings.rate_limit)
    return app
