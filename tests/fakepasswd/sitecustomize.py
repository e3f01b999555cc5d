"""Test support: the password database a test's exporter process sees.

With this directory on ``PYTHONPATH`` and ``FAKE_PASSWD`` set (``uid:name,uid:name``),
``pwd.getpwuid`` answers from that table alone and raises ``KeyError`` for every other uid,
as for a uid without an account: expositions then do not depend on the host's users.
``fakelib.fixed_passwd`` builds the environment.
"""

from __future__ import annotations

import os
import pwd

_TABLE = os.environ.get("FAKE_PASSWD")


def _getpwuid(uid: int) -> pwd.struct_passwd:
    for entry in (_TABLE or "").split(","):
        number, name = entry.split(":")
        if int(number) == uid:
            return pwd.struct_passwd((name, "*", uid, uid, "", "/nonexistent", "/bin/false"))
    raise KeyError(f"getpwuid(): uid not found: {uid}")


if _TABLE is not None:
    pwd.getpwuid = _getpwuid
