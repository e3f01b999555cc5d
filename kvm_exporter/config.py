"""The YAML configuration: one loader, frozen dataclasses, one error type.

Every key, its type and its default lives in the dataclasses below; ``config/kvm_exporter.yml``
documents the same keys for operators. Unknown keys are errors, so a typo never silently
falls back to a default. :func:`build` turns any YAML mapping into a frozen dataclass this way;
the web config (``webconfig.py``) is read with it too.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from .aggregate import MIN_SERIES

DEFAULT_PORT = 9429
LABELS = ("user", "tty", "state")
COUNT_LABELS = (*LABELS, "jail")
"""What the process counts can be grouped by (``jail``: FreeBSD's, ``host`` on Linux)."""
SOURCES = ("auto", "procfs", "libkvm")
LOG_LEVELS = ("debug", "info", "warn", "error")
RESOURCE_LABELS = ("user", "jail", "cgroup")
COMPAT = ("node_exporter",)
"""Other exporters whose metric names can be served too (``compat``)."""
PREDICATES = ("proc", "all", "pid", "pgrp", "session", "tty", "uid", "ruid")
"""kvm_getprocs(3) selections by name: ``proc`` is every process (kernel ones included),
``all`` is KERN_PROC_ALL (one row per thread); the rest select by ``libkvm.argument``."""


class ConfigError(Exception):
    """The configuration is unusable; the message names the file, the key and the problem."""


@dataclass(frozen=True)
class WebConfig:
    listen_address: str = f":{DEFAULT_PORT}"
    telemetry_path: str = "/metrics"
    config_file: str | None = None
    """exporter-toolkit web config (TLS, basic auth, headers)."""


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"


@dataclass(frozen=True)
class ProcfsConfig:
    root: str = "/proc"


@dataclass(frozen=True)
class LibkvmConfig:
    library: str = "libkvm.so.7"
    predicate: str = "proc"
    argument: int | None = None
    """The pid, process group, session, tty device number or uid that ``predicate`` selects."""
    threads: bool = False
    """Add KERN_PROC_INC_THREAD: one row per thread instead of per process."""
    kernel: str | None = None
    """Kernel image of a crash dump; with ``core`` set, the exporter reads the dump once."""
    core: str | None = None
    swapfile: str | None = None
    jail_library: str = "libjail.so.1"
    """Where jail_getname(3) comes from, to name jails (without it, a jail is its jid)."""


@dataclass(frozen=True)
class ResourcesConfig:
    enabled: bool = True
    """CPU, memory, faults (and on FreeBSD switches and block I/O) per group of processes."""
    labels: tuple[str, ...] = ("user",)
    """Group by these (``user``, ``jail``, ``cgroup``: Linux only, read once per process)."""


@dataclass(frozen=True)
class Config:
    source: str = "auto"
    interval: float = 15.0
    """Seconds between polls; 0 collects on every scrape."""
    labels: tuple[str, ...] = LABELS
    max_series: int = 1000
    """Most series per process metric; smaller groups fold into ``other`` past it."""
    compat: tuple[str, ...] = ()
    """Also serve these exporters' names for the same data (``node_exporter``)."""
    web: WebConfig = field(default_factory=WebConfig)
    log: LogConfig = field(default_factory=LogConfig)
    procfs: ProcfsConfig = field(default_factory=ProcfsConfig)
    libkvm: LibkvmConfig = field(default_factory=LibkvmConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)


MAX_DURATION = 365 * 86400.0
"""The longest interval accepted."""
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Seconds from a number or a Go-style duration (``500ms``, ``15s``, ``1m``)."""
    if isinstance(value, bool):
        raise ValueError("a duration such as 15s, 500ms, 1m or a number of seconds")
    if isinstance(value, (int, float)):
        seconds = float(value) if abs(value) <= MAX_DURATION else math.inf  # no OverflowError
    else:
        match = _DURATION.match(str(value).strip())
        if not match:
            raise ValueError("a duration such as 15s, 500ms, 1m or a number of seconds")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds < 0:
        raise ValueError("a duration of 0 or more")
    # inf or a huge wait overflows threading's timeout and kills the poller; NaN busy-loops it.
    if not seconds <= MAX_DURATION:
        raise ValueError(f"a duration of at most {MAX_DURATION:.0f}s (one year)")
    return seconds


def one_of(choices: tuple[str, ...]) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value not in choices:
            raise ValueError("one of " + ", ".join(choices))
        return value

    return check


def list_of(choices: tuple[str, ...], repeats: bool = False) -> Callable[[Any], tuple[str, ...]]:
    expected = "a list drawn from " + ", ".join(choices) + ("" if repeats else " without repeats")

    def parse(value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(expected)
        if not set(value) <= set(choices) or not repeats and len(set(value)) != len(value):
            raise ValueError(expected)
        return tuple(value)

    return parse


def _series_cap(value: Any) -> Any:
    if value < MIN_SERIES:
        raise ValueError(f"an integer of {MIN_SERIES} or more")
    return value


def _path(value: Any) -> Any:
    if not value.startswith("/"):
        raise ValueError("a path starting with /")
    return value


Rules = Mapping[str, Callable[[Any], Any]]
"""Functions by dotted YAML key (``log.level``) for :func:`build`."""

_PARSERS: Rules = {
    "interval": parse_duration,
    "labels": list_of(COUNT_LABELS),
    "compat": list_of(COMPAT),
    "resources.labels": list_of(RESOURCE_LABELS),
}
_CHECKS: Rules = {
    "source": one_of(SOURCES),
    "max_series": _series_cap,
    "log.level": one_of(LOG_LEVELS),
    "web.telemetry_path": _path,
    "libkvm.predicate": one_of(PREDICATES),
}

T = TypeVar("T")


def _is_union(hint: Any) -> bool:
    return get_origin(hint) in (Union, types.UnionType)


def _type_name(hint: Any) -> str:
    if _is_union(hint):
        return " or ".join(_type_name(a) for a in get_args(hint))
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(hint, "null" if hint is type(None) else str(hint))


def _matches(value: Any, hint: Any) -> bool:
    if _is_union(hint):
        return any(_matches(value, a) for a in get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def shown(value: Any) -> str:
    try:
        return repr(value)
    except ValueError:  # a hex integer of more than sys.get_int_max_str_digits() digits
        return "an integer too long to show"


class Invalid(ValueError):
    """What a parser or check raises when "got VALUE, expected TEXT" does not fit: the message
    follows the key as it is; ``at`` names an entry below the key (a user name)."""

    def __init__(self, message: str, at: str = "") -> None:
        super().__init__(message)
        self.at = at


def build(
    cls: type[T], data: Any, where: str, parsers: Rules, checks: Rules, prefix: str = ""
) -> T:
    """The frozen dataclass ``cls`` from the YAML mapping ``data``; any problem is a ConfigError
    naming ``where``, the dotted key and what was expected.

    Null is an empty mapping. A field's YAML key is its name or its ``metadata["key"]``; unknown
    keys are errors, a field without a default must be given. A field typed with a dataclass is
    a section built alike (typed ``X | None``, null or ``{}`` store None). ``parsers[key]`` turns
    the YAML value into the stored one instead of the type check; ``checks[key]`` runs after the
    type check (on a section, after building it). Both return the value to store or raise
    ValueError saying what was expected (or :class:`Invalid`).
    """
    if data is None:
        data = {}  # an empty file or section
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'top level'}: expected a mapping")
    hints = get_type_hints(cls)
    fields = {f.metadata.get("key", f.name): f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for name in data:
        if name not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(f"{where}: {prefix}{name}: unknown key (expected one of {allowed})")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        key, hint = prefix + name, hints[f.name]
        if name in data:
            value = data[name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            value = None  # checked as null, reported as missing
        else:
            continue
        options = get_args(hint) if _is_union(hint) else (hint,)
        section: Any = next((a for a in options if dataclasses.is_dataclass(a)), None)
        parse = parsers.get(key)
        try:
            if section is not None and value in (None, {}) and type(None) in options:
                value = None
            elif section is not None:
                value = build(section, value, where, parsers, checks, key + ".")
            elif parse is None and not _matches(value, hint):
                raise ValueError(_type_name(hint))
            check = parse or checks.get(key)
            if check is not None:
                value = check(value)
        except Invalid as err:
            raise ConfigError(f"{where}: {key}{'.' if err.at else ''}{err.at}: {err}") from None
        except ValueError as err:
            got = f"got {shown(data[name])}" if name in data else "missing"
            raise ConfigError(f"{where}: {key}: {got}, expected {err}") from None
        values[f.name] = value
    return cls(**values)


def parse_yaml(text: str, where: str) -> Any:
    """The data of YAML ``text``; malformed YAML is a ConfigError naming ``where``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        position = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{where}: {position}invalid YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{where}: invalid YAML: nested too deeply") from None
    except ValueError as err:  # an integer of more than sys.get_int_max_str_digits() digits
        raise ConfigError(f"{where}: invalid YAML: {err}") from None


def read_yaml(path: str, what: str = "config file") -> Any:
    """The data of the YAML file at ``path``; any problem is a one-line ConfigError."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ConfigError(f"{path}: cannot read {what}: {reason}") from None
    return parse_yaml(text, path)


def parse_config(text: str, where: str = "<config>") -> Config:
    """Build a :class:`Config` from YAML text; ``where`` names the file in errors."""
    return build(Config, parse_yaml(text, where), where, _PARSERS, _CHECKS)


def load_config(path: str | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read the config file at ``path`` (``None``: the built-in defaults), then apply the
    command line's ``overrides`` (see :func:`with_overrides`)."""
    config = Config()
    if path is not None:
        config = build(Config, read_yaml(path), path, _PARSERS, _CHECKS)
    return with_overrides(config, overrides or {})


def with_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """A copy of ``config`` where each key of ``overrides`` (``source``, ``web.listen_address``)
    whose value is not ``None`` replaces the file's setting: flags win over the file."""
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        check = _CHECKS.get(dotted)  # a flag gets the same checks as the file's key
        if check is not None:
            try:
                value = check(value)
            except ValueError as err:
                raise ConfigError(f"flag {dotted}: got {value!r}, expected {err}") from None
        section, _, key = dotted.rpartition(".")
        if section:
            sections.setdefault(section, {})[key] = value
        else:
            top[key] = value
    for name, values in sections.items():
        top[name] = dataclasses.replace(getattr(config, name), **values)
    return dataclasses.replace(config, **top)
