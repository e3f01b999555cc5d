"""The YAML configuration: one loader, frozen dataclasses, one error type.

Every key, its type and its default lives in the dataclasses below; ``config/kvm_exporter.yml``
documents the same keys for operators. Unknown keys are errors, so a typo never silently
falls back to a default. :func:`build` turns any YAML mapping into a frozen dataclass this way;
the web config (``webconfig.py``) is read with it too.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import reprlib
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from .aggregate import MIN_SERIES
from .files import Refused, Unreadable, load_yaml, read_file
from .groups.rules import Rule, RuleError, parse_process_names
from .logs import FORMATS, LEVELS
from .records import ARGV_BYTES, DETAILS

log = logging.getLogger(__name__)

DEFAULT_PORT = 9429
LABELS = ("user", "tty", "state")
COUNT_LABELS = (*LABELS, "jail")
"""What the process counts can be grouped by (``jail``: FreeBSD's, ``host`` on Linux)."""
SOURCES = ("auto", "procfs", "libkvm")
LOG_LEVELS = tuple(LEVELS)
LOG_FORMATS = tuple(FORMATS)
RESERVED_PATHS = ("/", "/-/healthy", "/-/ready")
"""The landing page and the health endpoints (app.py): no telemetry path may hide them."""
RESOURCE_LABELS = ("user", "jail", "cgroup")
PROCESS_EXPORTER = "process_exporter"
COMPAT = ("node_exporter", PROCESS_EXPORTER)
"""Other exporters whose metric names can be served too (``compat``)."""
PREDICATES = ("proc", "all", "pid", "pgrp", "session", "tty", "uid", "ruid")
"""kvm_getprocs(3) selections by name: ``proc`` is every process (kernel ones included),
``all`` is KERN_PROC_ALL (one row per thread); the rest select by ``libkvm.argument``."""


class ConfigError(Exception):
    """The configuration is unusable; the message names the file, the key and the problem."""


@dataclass(frozen=True)
class WebConfig:
    listen_address: tuple[str, ...] = (f":{DEFAULT_PORT}",)
    """host:port addresses, each serving the same endpoints (YAML: one string or a list)."""
    telemetry_path: str = "/metrics"
    config_file: str | None = None
    """exporter-toolkit web config (TLS, basic auth, headers)."""


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "logfmt"


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


TOP_BY = ("cpu", "memory")
"""What the top processes can be ranked by."""
MAX_TOP = 1000
"""The most top processes per ranking: each makes series of its own."""


@dataclass(frozen=True)
class TopConfig:
    """The top processes by CPU and by resident memory, each as series of its own (README: "Top
    processes"); the section given turns them on."""

    n: int = 10
    """Processes per ranking; one that ranked stays until it falls below ``2 n``."""
    by: tuple[str, ...] = TOP_BY
    cmdline: int = 0
    """Characters of the command line as a label (0: none; it can hold secrets)."""


@dataclass(frozen=True)
class GroupsConfig:
    """Named process groups in process-exporter's config format (``groups/rules.py``)."""

    process_names: tuple[Rule, ...] = ()
    config_file: str | None = None
    """process-exporter's own config file, read for its ``process_names``."""
    children: bool = True
    """process-exporter's ``-children``: an unmatched new process joins its parent's group."""
    details: tuple[str, ...] = ()
    """What more to read of each named process every poll (``records.DETAILS``), each at
    the cost of a file or two per named process."""


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
    groups: GroupsConfig = field(default_factory=GroupsConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    top: TopConfig | None = None
    """Off unless given (null or ``{}``: off)."""


MAX_DURATION = 365 * 86400.0
"""The longest interval accepted."""
_UNITS = (
    ("y", 365 * 86400.0),
    ("w", 7 * 86400.0),
    ("d", 86400.0),
    ("h", 3600.0),
    ("m", 60.0),
    ("s", 1.0),
    ("ms", 0.001),
)
"""Prometheus' duration units, largest first (a year is 365 days, as in Prometheus)."""
_DURATION = re.compile("".join(rf"(?:(\d+(?:\.\d+)?){unit})?" for unit, _ in _UNITS))
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_EXPECTED_DURATION = "a duration such as 15s, 1m30s, 500ms, 1h, 1d or a number of seconds"


def parse_duration(value: object) -> float:
    """Seconds from a number or a Prometheus duration: units y, w, d, h, m, s, ms, largest
    first, each at most once (``1h30m``, ``1d``, ``500ms``)."""
    if isinstance(value, bool):
        raise ValueError(_EXPECTED_DURATION)
    if isinstance(value, (int, float)):
        seconds = float(value) if abs(value) <= MAX_DURATION else math.inf  # no OverflowError
    else:
        text = str(value).strip()
        match = _DURATION.fullmatch(text)
        if _NUMBER.fullmatch(text):
            seconds = float(text)
        elif text and match:
            parts = zip(match.groups(), _UNITS, strict=True)
            seconds = sum(float(n) * unit for n, (_, unit) in parts if n is not None)
        else:
            raise ValueError(_EXPECTED_DURATION)
    if seconds < 0:
        raise ValueError("a duration of 0 or more")
    # inf or a huge wait overflows threading's timeout and kills the poller; NaN busy-loops it.
    if not seconds <= MAX_DURATION:
        raise ValueError(f"a duration of at most {MAX_DURATION:.0f}s (one year)")
    return seconds


def format_duration(seconds: float) -> str:
    """``seconds`` as a Prometheus duration (``1h30m``, ``500ms``, ``0s``)."""
    ms = round(seconds * 1000)
    parts = []
    for unit, size in _UNITS:
        count, ms = divmod(ms, round(size * 1000))
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


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


def _between(low: int, high: int) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if not low <= value <= high:
            raise ValueError(f"an integer from {low} to {high}")
        return value

    return check


def _top_by(value: Any) -> tuple[str, ...]:
    by = list_of(TOP_BY)(value)
    if not by:
        raise ValueError("a non-empty list drawn from " + ", ".join(TOP_BY))
    return by


def _series_cap(value: Any) -> Any:
    if value < MIN_SERIES:
        raise ValueError(f"an integer of {MIN_SERIES} or more")
    return value


def _telemetry_path(value: Any) -> Any:
    if not re.fullmatch(r"/[^\s?#]*", value):
        raise ValueError("a path starting with / without spaces, ? or #")
    if value in RESERVED_PATHS:
        raise ValueError("a path other than " + ", ".join(RESERVED_PATHS) + " (served already)")
    return value


_PORT = re.compile(r"[0-9]{1,5}")


def listen_host_port(address: str) -> tuple[str, int]:
    """(host, port) from ``:9429``, ``0.0.0.0:9429``, ``[::1]:9429`` or ``localhost:9429``;
    ValueError saying what was expected otherwise. The host is looked up when listening."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = "["
    if not sep or "[" in host or not _PORT.fullmatch(port) or int(port) > 65535:
        raise ValueError("host:port such as :9429, 127.0.0.1:9429 or [::1]:9429")
    return host, int(port)


def _listen_addresses(value: Any) -> tuple[str, ...]:
    addresses = [value] if isinstance(value, str) else value
    if not isinstance(addresses, list) or not addresses:
        raise ValueError("host:port or a non-empty list of them")
    for address in addresses:
        if not isinstance(address, str):
            raise Invalid(f"got {shown(address)}, expected a host:port string")
        try:
            listen_host_port(address)
        except ValueError as err:
            raise Invalid(f"got {shown(address)}, expected {err}") from None
    if len(set(addresses)) != len(addresses):
        raise ValueError("addresses without repeats")
    return tuple(addresses)


Rules = Mapping[str, Callable[[Any], Any]]
"""Functions by dotted YAML key (``log.level``) for :func:`build`."""


def _process_names(value: Any) -> tuple[Rule, ...]:
    try:
        return parse_process_names(value)
    except RuleError as err:
        raise Invalid(str(err), err.at) from None


def _groups(groups: GroupsConfig) -> GroupsConfig:
    """Read ``config_file`` (process-exporter's file; only its process_names key is read)."""
    if groups.config_file is None:
        return groups
    if groups.process_names:
        raise Invalid("give process_names or config_file, not both")
    path = groups.config_file
    data = read_yaml(path, "process-exporter config file", as_text=True)
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: top level: expected a mapping with process_names")
    names = data.get("process_names") if data else None  # none: no groups, as process-exporter
    try:
        rules = parse_process_names(names)
    except RuleError as err:
        raise ConfigError(f"{path}: process_names{'.' if err.at else ''}{err.at}: {err}") from None
    return dataclasses.replace(groups, process_names=rules)


_PARSERS: Rules = {
    "interval": parse_duration,
    "groups.process_names": _process_names,
    "labels": list_of(COUNT_LABELS),
    "web.listen_address": _listen_addresses,
    "compat": list_of(COMPAT),
    "groups.details": list_of(DETAILS),
    "resources.labels": list_of(RESOURCE_LABELS),
    "top.by": _top_by,
}
_CHECKS: Rules = {
    "source": one_of(SOURCES),
    "max_series": _series_cap,
    "log.level": one_of(LOG_LEVELS),
    "log.format": one_of(LOG_FORMATS),
    "web.telemetry_path": _telemetry_path,
    "libkvm.predicate": one_of(PREDICATES),
    "groups": _groups,
    "top.n": _between(1, MAX_TOP),
    "top.cmdline": _between(0, ARGV_BYTES),
}

FILE_KEYS = (
    "web.config_file",
    "groups.config_file",
    "libkvm.kernel",
    "libkvm.core",
    "libkvm.swapfile",
)
"""Keys naming a file. A relative path in a config file is relative to that file's folder,
not to the working directory (``/`` under systemd and daemon(8)); one given by a flag is
relative to the working directory, as for any command."""


def _files_beside(config_path: str) -> Rules:
    """:data:`_CHECKS` plus the full path of each :data:`FILE_KEYS` value, relative paths
    taken from the folder of the config file at ``config_path``."""
    folder = os.path.dirname(os.path.abspath(config_path))

    def resolve(value: str | None) -> str | None:
        return os.path.join(folder, value) if value else value

    return {**_CHECKS, **dict.fromkeys(FILE_KEYS, resolve)}


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


def _short_repr() -> reprlib.Repr:
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxlong, short.maxother = 3, 60, 40, 60
    short.maxdict = short.maxlist = short.maxtuple = short.maxset = 6
    return short


_SHORT = _short_repr()
_SHOWN_CHARS = 120


def shown(value: Any) -> str:
    """``repr(value)`` cut to at most about 120 characters, however large or nested the value."""
    try:
        text = _SHORT.repr(value)
    except ValueError:  # a hex integer of more than sys.get_int_max_str_digits() digits
        return "an integer too long to show"
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


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


def parse_yaml(text: str, where: str, as_text: bool = False) -> Any:
    """The data of YAML ``text``; malformed or oversized YAML is a ConfigError naming ``where``.
    ``as_text``: scalars as written, as :func:`~kvm_exporter.files.load_yaml` says."""
    try:
        return load_yaml(text, as_text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        position = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        problem = problem if len(problem) <= _SHOWN_CHARS else problem[:_SHOWN_CHARS] + "..."
        invalid = "" if isinstance(err, Refused) else "invalid YAML: "
        raise ConfigError(f"{where}: {position}{invalid}{problem}") from None
    except RecursionError:
        raise ConfigError(f"{where}: invalid YAML: nested too deeply") from None
    except ValueError as err:  # an integer of more than sys.get_int_max_str_digits() digits
        raise ConfigError(f"{where}: invalid YAML: {err}") from None


def read_text(path: str, what: str = "config file") -> str:
    """The text of the file at ``path``; any problem is a one-line ConfigError.

    The file must be a regular file of at most :data:`~kvm_exporter.files.MAX_FILE_BYTES`
    (a FIFO, a device or a directory is refused without blocking or reading it).
    """
    try:
        return read_file(path).decode("utf-8")
    except (Unreadable, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read {what}: {err}") from None


def read_yaml(path: str, what: str = "config file", as_text: bool = False) -> Any:
    """The data of the YAML file at ``path`` (see :func:`read_text`, :func:`parse_yaml`)."""
    return parse_yaml(read_text(path, what), path, as_text)


def parse_config(text: str, where: str = "<config>", checks: Rules | None = None) -> Config:
    """Build a :class:`Config` from YAML text; ``where`` names the file in errors. Rules
    read otherwise than strictly (process-exporter's leniency) are logged as warnings.
    ``checks``: the values' checks, :data:`_CHECKS` unless a file's (:func:`_files_beside`)."""
    data = parse_yaml(text, where)
    groups = data.get("groups") if isinstance(data, dict) else None
    if isinstance(groups, dict) and groups.get("process_names") is not None:
        # process-exporter's rules as it reads them: `comm: [yes]` is the comm "yes".
        groups["process_names"] = parse_yaml(text, where, as_text=True)["groups"]["process_names"]
    config = build(Config, data, where, _PARSERS, _CHECKS if checks is None else checks)
    rules_file = config.groups.config_file
    at = f"{rules_file}: process_names." if rules_file else f"{where}: groups.process_names."
    for rule in config.groups.process_names:
        for warning in rule.warnings:
            log.warning("%s%s", at, warning)
    if config.groups.details and not config.groups.process_names:
        log.warning(
            "%s: groups.details: no process_names rule names a process: none is read", where
        )
    return config


FLAGS = {
    "web.listen-address": "web.listen_address",
    "web.telemetry-path": "web.telemetry_path",
    "web.config.file": "web.config_file",
    "poll.interval": "interval",
    "collector.labels": "labels",
    "path.procfs": "procfs.root",
    "log.level": "log.level",
    "log.format": "log.format",
    "libkvm.library": "libkvm.library",
    "libkvm.kernel": "libkvm.kernel",
    "libkvm.core": "libkvm.core",
    "libkvm.swapfile": "libkvm.swapfile",
}
"""Command-line flag (without ``--``) -> the dotted config key it overrides."""


def load_config(path: str | None, flags: Mapping[str, Any] | None = None) -> Config:
    """Read the config file at ``path`` (``None``: the built-in defaults), then apply the
    command line's ``flags`` (see :func:`with_flags`)."""
    config = Config()
    if path is not None:
        config = parse_config(read_text(path), path, _files_beside(path))
    return with_flags(config, flags or {})


def with_flags(config: Config, flags: Mapping[str, Any]) -> Config:
    """A copy of ``config`` where each flag of ``flags`` (``web.listen-address``, see
    :data:`FLAGS`) whose value is not ``None`` replaces the file's setting: flags win over the
    file. A value is checked as the file's key would be; an error names the flag."""
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for flag, value in flags.items():
        if value is None:
            continue
        dotted = FLAGS[flag]
        rule = _PARSERS.get(dotted) or _CHECKS.get(dotted)
        if rule is not None:
            try:
                value = rule(value)
            except Invalid as err:
                raise ConfigError(f"--{flag}: {err}") from None
            except ValueError as err:
                raise ConfigError(f"--{flag}: got {shown(value)}, expected {err}") from None
        section, _, key = dotted.rpartition(".")
        if section:
            sections.setdefault(section, {})[key] = value
        else:
            top[key] = value
    for name, values in sections.items():
        top[name] = dataclasses.replace(getattr(config, name), **values)
    return dataclasses.replace(config, **top)
