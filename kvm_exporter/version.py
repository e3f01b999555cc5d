"""Build facts for ``--version`` and the start-up log line."""

from __future__ import annotations

import os
import platform
import sys
from importlib import resources

from . import __version__
from .gitrevision import checkout_revision

REVISION_FILE = "revision.txt"
"""Written into the package at build time by setup.py: the git commit built from."""


def revision() -> str:
    """The git commit this copy was built from (``-dirty`` with local changes); run from a
    git checkout (``python -m kvm_exporter`` in it), the commit checked out; else
    ``unknown`` (built outside a git checkout)."""
    try:
        text = resources.files(__package__).joinpath(REVISION_FILE).read_text().strip()
    except FileNotFoundError:  # not built: the source tree itself
        text = checkout_revision(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except (OSError, UnicodeDecodeError):
        text = ""
    return text or "unknown"


def version_text() -> str:
    """What ``--version`` prints, in the shape of the Prometheus family's version output."""
    return (
        f"kvm_exporter, version {__version__} (revision: {revision()})\n"
        f"  python version:   {platform.python_version()} ({platform.python_implementation()})\n"
        f"  platform:         {sys.platform}/{platform.machine()}\n"
    )
