"""Reading the files an operator names (config, web config, certificates) without trusting them.

A path may lead to a FIFO (``open`` would block until a writer comes), a device such as
``/dev/zero`` (endless), a directory, or a file far larger than any config: each is refused
with a reason, after reading at most :data:`MAX_FILE_BYTES` + 1 bytes. YAML in them is loaded
within limits on values, value and key lengths, so that aliases cannot expand without end.
"""

from __future__ import annotations

import os
import stat
from typing import Any

import yaml

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


MAX_YAML_NODES = 10_000
"""The most YAML values (scalars, lists, mappings) a file may hold, counting every use of an
alias as a copy of its value: a few hundred bytes of nested aliases cannot expand to millions."""
MAX_SCALAR_CHARS = 8192
"""The longest single value (a path, a header, a hash) accepted."""
MAX_KEY_CHARS = 256
"""The longest mapping key (a setting, a user or header name): errors show keys whole."""


class Refused(yaml.YAMLError):
    """The YAML is well formed but over a limit."""

    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader counting values as it composes them (see :data:`MAX_YAML_NODES`)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._count = 0
        self._sizes: dict[int, int] = {}  # id(node) -> values in it, aliases expanded

    def _add(self, count: int, mark: Any) -> None:
        self._count += count
        if self._count > MAX_YAML_NODES:
            raise Refused(
                f"more than {MAX_YAML_NODES} values (each use of an alias counts its whole "
                "value), expected a config file",
                mark,
            )

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            target = self.anchors.get(event.anchor)
            if target is not None:  # else PyYAML's own "found undefined alias"
                size = self._sizes.get(id(target))
                if size is None:
                    raise Refused(f"alias {event.anchor[:40]!r} refers to itself", event.start_mark)
                self._add(size, event.start_mark)
            return super().compose_node(parent, index)
        before = self._count
        node: Any = super().compose_node(parent, index)
        if isinstance(node, yaml.ScalarNode) and len(node.value) > MAX_SCALAR_CHARS:
            raise Refused(
                f"a value of {len(node.value)} characters, expected at most {MAX_SCALAR_CHARS}",
                node.start_mark,
            )
        if isinstance(node, yaml.MappingNode):
            for key, _ in node.value:
                if isinstance(key, yaml.ScalarNode) and len(key.value) > MAX_KEY_CHARS:
                    raise Refused(
                        f"a key of {len(key.value)} characters, expected at most {MAX_KEY_CHARS}",
                        key.start_mark,
                    )
        self._add(1, node.start_mark)
        self._sizes[id(node)] = self._count - before
        return node


class _TextLoader(_BoundedLoader):
    """A plain scalar that YAML 1.1 reads as a boolean, number or time stays the text it
    is, as go-yaml v2 gives it to a Go string field (``yes``, ``0x1F``, ``1.50``)."""


def _scalar_text(loader: yaml.SafeLoader, node: Any) -> Any:
    return loader.construct_scalar(node)


for _tag in ("bool", "int", "float", "timestamp"):
    _TextLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _scalar_text)


def load_yaml(text: str, as_text: bool = False) -> Any:
    """The data of one YAML document, by PyYAML's safe loader within the limits above;
    ``as_text``: every scalar but null as the text written (for fields Go reads as strings).

    Raises yaml.YAMLError (:class:`Refused` for a limit), RecursionError if nested too deeply.
    """
    loader = (_TextLoader if as_text else _BoundedLoader)(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
