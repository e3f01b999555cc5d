"""The git commit of a source checkout, for ``--version``. setup.py records it at build time
(loading this file by path: it imports nothing of the package); a copy run from a checkout,
which has no recorded one, asks git at run time."""

from __future__ import annotations

import os
import subprocess


def _git(top: str, *args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=top, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def checkout_revision(top: str) -> str:
    """The commit checked out at ``top`` (``-dirty`` with changes to tracked files), or ""
    where ``top`` is not the top of a git checkout (a folder inside another one's tree is
    not) or git cannot tell."""
    if not os.path.exists(os.path.join(top, ".git")):
        return ""  # no git to start for an installed copy
    found = _git(top, "rev-parse", "--show-toplevel")
    if not found or not os.path.samefile(found, top):
        return ""
    commit = _git(top, "rev-parse", "HEAD")
    if commit and _git(top, "status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    return commit
