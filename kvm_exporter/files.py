"""Reading the files an operator names (config, web config, certificates) without trusting them.

A path may lead to a FIFO (``open`` would block until a writer comes), a device such as
``/dev/zero`` (endless), a directory, or a file far larger than any config: each is refused
with a reason, after reading at most :data:`MAX_FILE_BYTES` + 1 bytes.
"""

from __future__ import annotations

import os
import stat

MAX_FILE_BYTES = 4 * 1024 * 1024
"""The largest config, web config, certificate or key file read (4 MiB)."""

_KINDS = {  # worded like strerror(3): "Is a directory"
    stat.S_IFDIR: "Is a directory",
    stat.S_IFIFO: "Is a FIFO",
    stat.S_IFCHR: "Is a character device",
    stat.S_IFBLK: "Is a block device",
    stat.S_IFSOCK: "Is a socket",
}


class Unreadable(Exception):
    """The file cannot be used; the message is the reason, without the path."""


def _check(mode: int, size: int, limit: int) -> None:
    if not stat.S_ISREG(mode):
        kind = _KINDS.get(stat.S_IFMT(mode), "Not a regular file")
        raise Unreadable(f"{kind}, expected a regular file")
    if size > limit:
        raise Unreadable(f"Too large, expected at most {limit} bytes ({limit >> 20} MiB)")


def read_file(path: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of the regular file at ``path``, at most ``limit`` of them; never blocks.

    Raises :class:`Unreadable` if the path is missing, unreadable, not a regular file
    (checked before opening, and again on what was opened), or longer than ``limit``.
    """
    try:
        info = os.stat(path)
        _check(info.st_mode, info.st_size, limit)
        # O_NONBLOCK: if the path became a FIFO since the stat, open returns at once.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as err:
        raise Unreadable(err.strerror or str(err)) from None
    try:
        info = os.fstat(fd)
        _check(info.st_mode, info.st_size, limit)
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, limit + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as err:
        raise Unreadable(err.strerror or str(err)) from None
    finally:
        os.close(fd)
    _check(info.st_mode, total, limit)  # it grew after the fstat
    return b"".join(chunks)
