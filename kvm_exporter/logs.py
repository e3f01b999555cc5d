"""Logging: one logfmt line per event on stderr (syslog via daemon(8), or the journal)."""

from __future__ import annotations

import contextlib
import logging
import os
import time

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}


class LogfmtFormatter(logging.Formatter):
    """``ts=... level=info msg="..."``, the format of the Prometheus family's daemons."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage().replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        level = {"WARNING": "warn"}.get(record.levelname, record.levelname.lower())
        return f'ts={ts}.{int(record.msecs):03d}Z level={level} logger={record.name} msg="{msg}"'


class StderrHandler(logging.Handler):
    """One ``write(2)`` per line on file descriptor 2, unbuffered: on a full disk or a closed
    stderr that line is lost and nothing else (a buffered stream keeps the failed bytes and
    fails again when the interpreter flushes it at exit, turning exit status 0 into 120)."""

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(OSError):
            os.write(2, (self.format(record) + "\n").encode("utf-8", "replace"))


def setup(level: str) -> None:
    """Send the package's log lines to stderr at ``level``."""
    logging.raiseExceptions = False  # a full disk or closed stderr must not kill the exporter
    handler = StderrHandler()
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger("kvm_exporter")
    root.handlers[:] = [handler]
    root.propagate = False
    set_level(level)


def set_level(level: str) -> None:
    logging.getLogger("kvm_exporter").setLevel(LEVELS[level])
