"""Choose the platform source once, from the config or the running system."""

from __future__ import annotations

import sys

from ..config import Config
from ..records import Source


def default_source_name(platform: str = sys.platform) -> str:
    """``libkvm`` on FreeBSD, ``procfs`` everywhere else."""
    return "libkvm" if platform.startswith("freebsd") else "procfs"


def open_source(config: Config) -> Source:
    """Open the source ``config.source`` names (``auto`` picks by platform).

    Raises :class:`~kvm_exporter.records.SourceError` if it cannot be opened.
    """
    name = default_source_name() if config.source == "auto" else config.source
    if name == "libkvm":
        from .libkvm import LibkvmSource

        return LibkvmSource(config.libkvm)
    from .procfs import ProcfsSource

    return ProcfsSource(config.procfs.root)
