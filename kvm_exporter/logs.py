"""Logging: one logfmt line per event on stderr (syslog via daemon(8), or the journal)."""

from __future__ import annotations

import logging
import sys
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


def setup(level: str) -> None:
    """Send the package's log lines to stderr at ``level``."""
    logging.raiseExceptions = False  # a full disk or closed stderr must not kill the exporter
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger("kvm_exporter")
    root.handlers[:] = [handler]
    root.propagate = False
    set_level(level)


def set_level(level: str) -> None:
    logging.getLogger("kvm_exporter").setLevel(LEVELS[level])
