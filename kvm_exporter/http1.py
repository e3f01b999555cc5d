"""HTTP/1.x on the wire: request heads found incrementally and checked strictly.

Bytes in, requests or :class:`HttpError` out; the server in :mod:`kvm_exporter.web` owns the
sockets. Where RFC 9112 lets a server refuse a request (whitespace before a header's colon,
folded header lines, a missing Host), this refuses it as Go's net/http does.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import NamedTuple

MAX_HEAD = 16384
"""Most bytes of a request head, request line and blank line included; past it, 431."""

_HEAD_END = re.compile(rb"\n\r?\n")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_TARGET = re.compile(rb"/[\x21-\x7e]*|\*")
_ABSOLUTE = re.compile(rb"https?://[\x21-\x2e\x30-\x7e]*(/[\x21-\x7e]*)?", re.IGNORECASE)
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class HttpError(Exception):
    """A request to answer with ``status`` and a one-line ``detail``, then close."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status} {detail}")
        self.status, self.detail = status, detail

    def response(self, version: str = "HTTP/1.1") -> bytes:
        body = f"{self.detail}\n".encode()
        phrase = HTTPStatus(self.status).phrase
        return (
            f"{version} {self.status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body


class Request(NamedTuple):
    method: str
    path: str
    """Still percent-encoded."""
    query: str
    version: str
    """``HTTP/1.0`` or ``HTTP/1.1``."""
    headers: list[tuple[str, str]]
    """Names as sent, values without surrounding whitespace; both latin-1 decoded."""
    keep_alive: bool
    has_body: bool
    """The request announced a body, which the server does not read: it closes after."""
    line: str
    """The request line, escaped for logs."""


class HeadBuffer:
    """A connection's bytes until a request head ends. Finding the end costs O(new bytes)
    per :meth:`feed`, so a head dripped one byte at a time costs O(n), not O(n²)."""

    __slots__ = ("_data", "_scanned")

    def __init__(self) -> None:
        self._data = bytearray()
        self._scanned = 0

    def __bool__(self) -> bool:
        return bool(self._data)

    def feed(self, chunk: bytes) -> None:
        self._data += chunk

    def take(self) -> Request | None:
        """The next complete request, or None until its head is complete.

        Raises HttpError for a head over :data:`MAX_HEAD` or one that does not parse.
        """
        data = self._data
        if data and data[0] in b"\r\n":  # empty lines before a request line are ignored
            del data[: len(data) - len(data.lstrip(b"\r\n"))]
            self._scanned = 0
        end = _HEAD_END.search(data, max(0, self._scanned - 3))
        if end is None:
            self._scanned = len(data)
            if len(data) > MAX_HEAD:
                raise HttpError(431, "request head too large")
            return None
        if end.end() > MAX_HEAD:
            raise HttpError(431, "request head too large")
        head = bytes(data[: end.end()])
        del data[: end.end()]
        self._scanned = 0
        return parse_head(head)


def printable(data: bytes, limit: int = 160) -> str:
    """``data`` for a log line: non-printable bytes escaped, at most ``limit`` characters."""
    text = data[:limit].decode("latin-1").encode("unicode_escape").decode("ascii")
    return text[:limit] + ("..." if len(text) > limit or len(data) > limit else "")


def parse_head(head: bytes) -> Request:
    """The request of a complete head (request line, header lines, blank line)."""
    lines = [line[:-1] if line.endswith(b"\r") else line for line in head.split(b"\n")]
    line = printable(lines[0])
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise HttpError(400, f"malformed request line: {line}")
    method, target, version = parts
    match = _VERSION.fullmatch(version)
    if match is None:
        raise HttpError(400, f"malformed HTTP version: {printable(version, 20)}")
    if match[1] != b"1":
        raise HttpError(505, f"unsupported protocol version: {printable(version, 20)}")
    if not _TOKEN.fullmatch(method):
        raise HttpError(400, f"malformed method: {printable(method, 20)}")
    absolute = _ABSOLUTE.fullmatch(target)
    if absolute is not None:
        target = absolute[1] or b"/"
    elif not _TARGET.fullmatch(target):
        raise HttpError(400, f"malformed request target: {printable(target, 60)}")
    headers = [_header(raw) for raw in lines[1:] if raw]
    fields: dict[str, list[str]] = {}
    for name, value in headers:
        fields.setdefault(name.lower(), []).append(value)
    http11 = match[2] != b"0"
    if http11 and len(fields.get("host", ())) != 1:
        raise HttpError(400, "too many Host headers" if "host" in fields else "missing Host header")
    lengths = {v.strip() for value in fields.get("content-length", ()) for v in value.split(",")}
    if len(lengths) > 1 or not all(v.isdigit() and v.isascii() for v in lengths):
        raise HttpError(400, "bad Content-Length")
    if "transfer-encoding" in fields and (lengths or not http11):
        raise HttpError(400, "Transfer-Encoding with Content-Length or in HTTP/1.0")
    tokens = {t.strip().lower() for value in fields.get("connection", ()) for t in value.split(",")}
    has_body = "transfer-encoding" in fields or any(int(v) for v in lengths)
    keep_alive = ("close" not in tokens if http11 else "keep-alive" in tokens) and not has_body
    path, _, query = target.decode("latin-1").partition("?")
    return Request(
        method.decode(), path, query, f"HTTP/1.{1 if http11 else 0}", headers, keep_alive,
        has_body, line,
    )  # fmt: skip


def _header(raw: bytes) -> tuple[str, str]:
    if raw[:1] in (b" ", b"\t"):
        raise HttpError(400, "folded header line")
    name, sep, value = raw.partition(b":")
    if not sep or not _TOKEN.fullmatch(name):
        raise HttpError(400, f"malformed header line: {printable(raw, 60)}")
    value = value.strip(b" \t")
    if _BAD_VALUE.search(value):
        raise HttpError(400, f"control character in header {printable(name, 60)}")
    return name.decode("latin-1"), value.decode("latin-1")
