"""Build facts for ``--version`` and the start-up log line."""

from __future__ import annotations

import platform
import sys
from importlib import resources

from . import __version__

REVISION_FILE = "revision.txt"
"""Written into the package at build time by setup.py: the git commit built from."""


def revision() -> str:
    """The git commit this copy was built from (``-dirty`` with local changes), or
    ``unknown`` (built outside a git checkout, or run from the source tree)."""
    try:
        text = resources.files(__package__).joinpath(REVISION_FILE).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return "unknown"
    return text or "unknown"


def version_text() -> str:
    """What ``--version`` prints, in the shape of the Prometheus family's version output."""
    return (
        f"kvm_exporter, version {__version__} (revision: {revision()})\n"
        f"  python version:   {platform.python_version()} ({platform.python_implementation()})\n"
        f"  platform:         {sys.platform}/{platform.machine()}\n"
    )
