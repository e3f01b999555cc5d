"""Answering in the web server's event loop: code that may block says so instead (issue 23).

The event loop answers a plain-HTTP request itself when the app can do it without blocking
(the exposition rendered already, the credentials checked before): no hand-off to a worker
thread, so under a thousand back-to-back scrapers the loop, which also accepts new
connections, does not wait for the GIL behind the workers. While the loop runs the app,
:func:`refuse_to_block` raises :class:`WouldBlock` at every point that could wait (a render,
a poll, bcrypt, a lock another thread holds); the server then hands the request to a worker,
which runs the app again from the start. Apps that return an iterator instead of a list are
run again by a worker too.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class WouldBlock(Exception):
    """The request needs a worker: answering it could wait."""


_here = threading.local()


@contextmanager
def without_blocking() -> Iterator[None]:
    """Run the block as the event loop does: :func:`refuse_to_block` raises in it."""
    _here.loop = True
    try:
        yield
    finally:
        _here.loop = False


def refuse_to_block() -> None:
    """Raise :class:`WouldBlock` inside :func:`without_blocking`; otherwise nothing."""
    if getattr(_here, "loop", False):
        raise WouldBlock
