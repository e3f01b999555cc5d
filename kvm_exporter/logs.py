"""Logging: one line per event on stderr (syslog via daemon(8), or the journal), as logfmt
or JSON. A message's fields go in ``extra={"fields": {...}}`` and become keys of the line."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import traceback
from typing import Any, NoReturn

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}

MAX_VALUE = 2048
"""Most characters of one value (a message, a field) in a line; the rest is cut."""
MAX_TRACEBACK = 16384
"""Most characters of a traceback in a line; its start is cut (the end says what failed)."""

EXIT_CRASH = 70
"""Exit status after an unexpected error (sysexits' EX_SOFTWARE): a supervisor restarts."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_BARE = re.compile(r'[^\s"=\\]+')


def _escape_control(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or f"\\u{ord(char):04x}"


def _cap(text: str, limit: int, keep_end: bool = False) -> str:
    if len(text) <= limit:
        return text
    cut = f"[{len(text) - limit} characters cut]"
    return cut + text[-limit:] if keep_end else text[:limit] + cut


Value = str | bool | int
"""A value of a line: JSON keeps booleans and integers as such, logfmt writes them bare."""


def _field(value: Any) -> Value:
    if isinstance(value, (bool, int)):
        return value
    return _cap(str(value), MAX_VALUE)


def _items(record: logging.LogRecord) -> list[tuple[str, Value]]:
    """The line's keys and values, text capped; the traceback (if any) last, as ``exc``."""
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    level = {"WARNING": "warn"}.get(record.levelname, record.levelname.lower())
    items: list[tuple[str, Value]] = [
        ("ts", f"{ts}.{int(record.msecs):03d}Z"),
        ("level", level),
        ("logger", record.name),
        ("msg", _cap(record.getMessage(), MAX_VALUE)),
    ]
    fields: dict[str, Any] = getattr(record, "fields", {})
    items += [(key, _field(value)) for key, value in fields.items()]
    if record.exc_info:
        text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        items.append(("exc", _cap(text, MAX_TRACEBACK, keep_end=True)))
    return items


class LogfmtFormatter(logging.Formatter):
    """``ts=... level=info logger=... msg="..." key=value``, the Prometheus family's format;
    control characters are escaped, so one event is always one line."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{key}={_logfmt_value(key, value)}" for key, value in _items(record))


def _logfmt_value(key: str, value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if key != "msg" and _BARE.fullmatch(value) and not _CONTROL.search(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + _CONTROL.sub(_escape_control, escaped) + '"'


class JSONFormatter(logging.Formatter):
    """One JSON object per line with the same keys as logfmt; non-ASCII is escaped too."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(dict(_items(record)), ensure_ascii=True)


FORMATS: dict[str, type[logging.Formatter]] = {"logfmt": LogfmtFormatter, "json": JSONFormatter}


class StderrHandler(logging.Handler):
    """One ``write(2)`` per line on file descriptor 2, unbuffered: on a full disk or a closed
    stderr that line is lost and nothing else (a buffered stream keeps the failed bytes and
    fails again when the interpreter flushes it at exit, turning exit status 0 into 120)."""

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(OSError):
            os.write(2, (self.format(record) + "\n").encode("utf-8", "replace"))


def setup(level: str, fmt: str = "logfmt") -> None:
    """Send the package's log lines to stderr at ``level`` in format ``fmt``."""
    logging.raiseExceptions = False  # a full disk or closed stderr must not kill the exporter
    handler = StderrHandler()
    root = logging.getLogger("kvm_exporter")
    root.handlers[:] = [handler]
    root.propagate = False
    configure(level, fmt)


def configure(level: str, fmt: str) -> None:
    """Change the level and format of the lines :func:`setup` sends (on reload)."""
    root = logging.getLogger("kvm_exporter")
    root.setLevel(LEVELS[level])
    for handler in root.handlers:
        handler.setFormatter(FORMATS[fmt]())


def crash(what: str) -> NoReturn:
    """Log the exception being handled as one error line with its traceback, then end the
    process at once with :data:`EXIT_CRASH`, so that its supervisor restarts it: a service
    whose ``what`` died must not go on looking alive."""
    logging.getLogger("kvm_exporter").error(
        "%s failed unexpectedly: exiting so that the supervisor restarts kvm_exporter",
        what,
        exc_info=True,
    )
    os._exit(EXIT_CRASH)
