r"""process-exporter's ``process_names``: matchers and name templates, as its config says.

Semantics mirror ncabatoff/process-exporter (``config/config.go``, README "Using a config
file"): the rules are tried in order and the first whose selectors all match names the process.
``comm`` is a list of exact comm values (any may match); ``exe`` a list of argv[0] values,
where one without a slash matches argv[0]'s basename and one with a slash must equal argv[0];
``cmdline`` a list of regexes that must all be found in the arguments joined by spaces, their
named groups filling ``.Matches``. ``name`` (default ``{{.ExeBase}}``) is a Go-template subset:
literal text and the fields of process-exporter's ``templateParams`` (``{{.Comm}}``,
``{{.ExeBase}}``, ``{{.ExeFull}}``, ``{{.Username}}``, ``{{.PID}}``, ``{{.StartTime}}``,
``{{.Cgroups}}``, ``{{.Matches}}``, ``{{.Matches.NAME}}``), printed as Go prints them.
``ExeBase``/``ExeFull`` come from argv[0], or from comm when there are no arguments (a kernel
process, or arguments that cannot be read). A field process-exporter does not have fails its
template there: the name is the text before it, as process-exporter's (which ignores the error).

The regexes are RE2's, as Go's ``regexp`` that process-exporter compiles them with: the same
syntax (POSIX classes, ASCII ``\d``/``\w``, ``\pL``, ``\Q..\E``, no lookaround or
back-references), the same leftmost-first matching, and a match in time linear in the command
line, whatever the pattern and whoever wrote the arguments.

Nothing here reads the system: :func:`parse_process_names` checks a config, :meth:`Rule.name_of`
names a process from what the caller read.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import re2

DEFAULT_TEMPLATE = "{{.ExeBase}}"
FIELDS = ("Comm", "ExeBase", "ExeFull", "Username", "PID", "StartTime", "Cgroups", "Matches")
"""process-exporter's template fields (its ``templateParams``)."""
PER_PROCESS = ("PID", "StartTime")
"""Fields that make one group (one series in each metric) of every process."""
NO_VALUE = "<no value>"
"""What Go's text/template prints for a ``.Matches`` key no regex captured."""
EMPTY_NAME = "<empty>"
"""The group of a process whose name comes out empty (an empty comm under ``{{.Comm}}``): a
label value "" is no label at all to Prometheus, the series would lose its group."""
ZERO_TIME = "0001-01-01 00:00:00 +0000 UTC"
"""Go's zero ``time.Time``: ``{{.StartTime}}`` of a process whose start the source lacks."""

_RE2 = re2.Options()
_RE2.log_errors = False  # a bad pattern is refused with RE2's message, not also logged by RE2
"""RE2's defaults are Go's ``regexp.Compile``: Perl classes and ``\\b``, one line (``$`` only at
the very end, not before a trailing newline), leftmost-first matching, UTF-8."""
_CAPTURE_NAME = re.compile(r"[A-Za-z0-9_]+")
"""What Go takes as a capture group's name (RE2 takes more)."""
_AS_GO_READS = dict.fromkeys(range(0xDC80, 0xDD00), "\ufffd")
"""Each byte of the arguments that is not UTF-8 (kept as a lone surrogate) is, to Go's regexp,
one U+FFFD: ``.`` matches it, as it does not in RE2 C++."""

_ACTION = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_CHAIN = re.compile(r"(?:\.[A-Za-z_]\w*)+")
_SELECTORS = ("comm", "exe", "cmdline")


class RuleError(ValueError):
    """A ``process_names`` entry is unusable; ``at`` names it (``2.name``: entry 2's name)."""

    def __init__(self, message: str, at: str) -> None:
        super().__init__(message)
        self.at = at


def _no_cgroups() -> tuple[str, ...]:
    return ()


class Argv(NamedTuple):
    """What a rule may look at for one process. ``argv`` is called at most once, and only
    by a rule that needs it: it returns the arguments, or None if they cannot be read;
    ``cgroups`` (the process's cgroup paths) is called only by a name that prints them."""

    comm: str
    username: str
    argv: Callable[[], tuple[str, ...] | None]
    pid: int = 0
    start_time: float | None = None
    """Seconds since the epoch; None where the source cannot know it."""
    cgroups: Callable[[], tuple[str, ...]] = _no_cgroups


@dataclass(frozen=True)
class Cmdline:
    """One ``cmdline`` regex, compiled by RE2, with the name of each group by number."""

    source: str
    regex: re2._Regexp[str] = field(compare=False)  # RE2 objects compare by identity: a
    # reloaded config's rules must equal the running ones, or the groups start afresh
    names: tuple[str, ...]
    """Go's ``SubexpNames``: "" for the whole match (0) and each unnamed group. RE2's own index
    keeps the first group of a repeated name; Go, and so process-exporter, the last."""

    def captures(self, text: str) -> dict[str, str] | None:
        """process-exporter's ``.Matches`` from this regex found in ``text``: each group's
        text by name, a later group of a repeated name overwriting an earlier one and a group
        that took no part giving ""; None if it is not found."""
        found = self.regex.search(text if text.isascii() else text.translate(_AS_GO_READS))
        if found is None:
            return None
        out = {}
        for i, name in enumerate(self.names):
            start, end = found.span(i)  # offsets into text, whose length translate kept
            out[name] = text[start:end] if start >= 0 else ""
        return out


def compile_cmdline(source: str) -> Cmdline:
    """``source`` compiled as Go's ``regexp.Compile`` would; ValueError with RE2's (or Go's)
    reason for what Go refuses."""
    try:
        regex = re2.compile(source, _RE2)
    except re2.error as err:
        reason = err.args[0] if err.args else "invalid"
        raise ValueError(reason.decode() if isinstance(reason, bytes) else str(reason)) from None
    except UnicodeEncodeError:
        raise ValueError("invalid UTF-8") from None
    names = _group_names(source)
    if len(names) != regex.groups + 1:  # the scan below disagrees with RE2: never guess
        raise ValueError(f"cannot number its {regex.groups} groups")
    return Cmdline(source, regex, names)


def _group_names(source: str) -> tuple[str, ...]:
    """Go's ``SubexpNames`` of a pattern RE2 compiled; ValueError for what RE2 takes and Go
    refuses: ``\\C`` (any byte) and group names beyond ``[A-Za-z0-9_]``."""
    names = [""]
    i = 0
    while i < len(source):
        if source.startswith("\\Q", i):  # literal text up to \E or the end
            end = source.find("\\E", i + 2)
            i = len(source) if end < 0 else end + 2
        elif source.startswith("\\C", i):
            raise ValueError("invalid escape sequence: \\C")
        elif source[i] == "\\":
            i += 2
        elif source[i] == "[":
            i = _class_end(source, i + 1)
        elif source.startswith(("(?P<", "(?<"), i):
            start = source.index("<", i) + 1
            end = source.index(">", start)
            if not _CAPTURE_NAME.fullmatch(source[start:end]):
                raise ValueError(f"invalid named capture: {source[i : end + 1]}")
            names.append(source[start:end])
            i = end + 1
        else:
            if source[i] == "(" and not source.startswith("(?", i):
                names.append("")
            i += 1
    return tuple(names)


def _class_end(source: str, i: int) -> int:
    """Where the character class opened just before ``i`` ends (after its ``]``)."""
    i += source.startswith("^", i)
    i += source.startswith("]", i)  # a ] first is literal
    while i < len(source) and source[i] != "]":
        posix = source.find(":]", i + 2) if source.startswith("[:", i) else -1
        i = posix + 2 if posix >= 0 else i + 1 + (source[i] == "\\")
    return i + 1


Part = tuple[str, str]
"""One piece of a compiled template: ("text", literal), ("field", name), ("match", key),
("matches", "") for the whole map, ("past_match", key) for ``.Matches.KEY.MORE``, and
("stop", action) for an action Go fails on (the name ends before it)."""


@dataclass(frozen=True)
class Rule:
    """One ``process_names`` entry, checked and compiled."""

    template: str
    parts: tuple[Part, ...]
    comm: frozenset[str] | None
    exe: tuple[tuple[str, str], ...] | None
    """(basename, full path or "" for any path) per ``exe`` entry; a later one with the same
    basename replaces an earlier one, as in process-exporter's map."""
    cmdline: tuple[Cmdline, ...] | None
    warnings: tuple[str, ...] = ()
    """What of the entry was read otherwise than a strict reading would, each "AT: what": for
    the loader to log with the file's name."""

    @property
    def needs_argv(self) -> bool:
        return (
            self.exe is not None
            or self.cmdline is not None
            or any(p == ("field", "ExeBase") or p == ("field", "ExeFull") for p in self.parts)
        )

    def name_of(self, proc: Argv, argv: tuple[str, ...]) -> str | None:
        """The group name of ``proc`` whose arguments are ``argv`` (empty if unreadable),
        or None if this rule does not match it."""
        if self.comm is not None and proc.comm not in self.comm:
            return None
        if self.exe is not None:
            if not argv:
                return None
            wanted = dict(self.exe).get(go_base(argv[0]))
            if wanted is None or wanted and wanted != argv[0]:
                return None
        matches: dict[str, str] = {}
        if self.cmdline is not None:
            joined = " ".join(argv)
            for regex in self.cmdline:
                found = regex.captures(joined)
                if found is None:
                    return None
                matches.update(found)
        out = []
        for kind, value in self.parts:
            if kind == "stop" or kind == "past_match" and value in matches:
                break  # Go's execution fails here (a string has no fields); the rest is lost
            if kind == "text":
                out.append(value)
            elif kind == "field":
                out.append(_field_value(value, proc, argv))
            elif kind == "matches":  # fmt prints a map's keys sorted
                out.append("map[" + " ".join(f"{k}:{v}" for k, v in sorted(matches.items())) + "]")
            else:
                out.append(matches.get(value, NO_VALUE))
        return label_text("".join(out))


def _field_value(field: str, proc: Argv, argv: tuple[str, ...]) -> str:
    """A field of process-exporter's ``templateParams`` as Go's text/template prints it."""
    if field == "Comm":
        return proc.comm
    if field == "Username":
        return proc.username
    if field == "PID":
        return str(proc.pid)
    if field == "StartTime":
        return go_time(proc.start_time)
    if field == "Cgroups":
        return "[" + " ".join(proc.cgroups()) + "]"
    exe_full = argv[0] if argv else proc.comm
    return exe_full if field == "ExeFull" or not argv else go_base(exe_full)


def go_time(seconds: float | None) -> str:
    """Go's ``time.Time.String()`` of a UTC time, as process-exporter's start times are:
    ``2026-12-07 16:05:38.37 +0000 UTC`` (fraction without trailing zeros)."""
    if seconds is None:
        return ZERO_TIME
    whole = math.floor(seconds)
    micros = round((seconds - whole) * 1e6)  # a float holds no finer than that
    whole, micros = whole + micros // 1_000_000, micros % 1_000_000
    text = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(whole))
    fraction = f".{micros:06d}".rstrip("0") if micros else ""
    return f"{text}{fraction} +0000 UTC"


def label_text(name: str) -> str:
    """A group name as a label value: bytes that are not UTF-8 (lone surrogates from a comm
    or the arguments) as ``\\xNN``, so that names differing only there stay apart, and
    :data:`EMPTY_NAME` for ""."""
    if not name:
        return EMPTY_NAME
    if name.isascii():
        return name
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def name_of(rules: tuple[Rule, ...], proc: Argv) -> tuple[str | None, bool]:
    """The first matching rule's name for ``proc`` (None: no rule matches), and whether its
    arguments were wanted and could not be read (then matched as if it had none)."""
    name, _, unreadable = first_match(rules, proc)
    return name, unreadable


def first_match(rules: tuple[Rule, ...], proc: Argv) -> tuple[str | None, int, bool]:
    """:func:`name_of` and the index of the rule that named ``proc`` (-1 if none): the folding
    under the series cap gives each rule its own share."""
    argv: tuple[str, ...] | None = None
    unreadable = False
    for index, rule in enumerate(rules):
        if argv is None and rule.needs_argv:
            got = proc.argv()
            unreadable = got is None
            argv = got or ()
        name = rule.name_of(proc, argv or ())
        if name is not None:
            return name, index, unreadable
    return None, -1, unreadable


def go_base(path: str) -> str:
    """Go's ``filepath.Base``: the last element, trailing slashes dropped; "." for "", "/"
    for slashes only."""
    if not path:
        return "."
    stripped = path.rstrip("/")
    if not stripped:
        return "/"
    return stripped.rsplit("/", 1)[-1]


def compile_template(template: str, at: str) -> tuple[Part, ...]:
    """The parts of a ``name`` template; anything beyond the supported subset is refused."""
    parts: list[Part] = []
    pos = 0
    for action in _ACTION.finditer(template):
        text = template[pos : action.start()]
        body = action.group(1)
        if body.startswith("- "):  # Go's trim markers: drop the whitespace beside the action
            text, body = text.rstrip(), body[2:]
        trim_after = body.endswith(" -")
        if trim_after:
            body = body[:-2]
        if text:
            parts.append(("text", text))
        parts.append(_field(body.strip(), at))
        pos = action.end()
        if trim_after:
            pos += len(template[pos:]) - len(template[pos:].lstrip())
    rest = template[pos:]
    if "{{" in rest:
        raise RuleError(f"unclosed action in {template!r}", at)
    if rest:
        parts.append(("text", rest))
    return tuple(parts)


def _field(body: str, at: str) -> Part:
    """The part of one action: a field chain as Go's text/template evaluates it on
    process-exporter's ``templateParams``; anything else (pipelines, functions) is refused."""
    if not _CHAIN.fullmatch(body):
        supported = ", ".join("{{." + f + "}}" for f in FIELDS) + ", {{.Matches.NAME}}"
        raise RuleError(f"unsupported template action {{{{{body}}}}} (supported: {supported})", at)
    field, *rest = body[1:].split(".")
    if field == "Matches":
        kinds = ("matches", "match", "past_match")
        return (kinds[min(len(rest), 2)], rest[0] if rest else "")
    if field == "StartTime" and rest:
        raise RuleError(f"unsupported template action {{{{{body}}}}}: methods of a time", at)
    if field not in FIELDS or rest:
        return ("stop", f"{{{{{body}}}}}")
    return ("field", field)


def _warnings(parts: tuple[Part, ...], at: str) -> list[str]:
    """What a name template does that its author may not expect."""
    out = []
    for kind, value in parts:
        if kind == "stop":
            out.append(
                f"{at}: {value} is no field process-exporter has: names end before it, as its "
                "template execution fails there"
            )
        elif kind == "past_match":
            out.append(
                f"{at}: a field of {{{{.Matches.{value}}}}} is no field process-exporter has: "
                "names end before it where the regex captured it, as its template execution "
                "fails there"
            )
        elif kind == "field" and value in PER_PROCESS:
            out.append(
                f"{at}: {{{{.{value}}}}} makes a group of every process it names: a series each "
                "in every group metric, up to max_series, past which the smallest fold into other"
            )
    return out


def _strings(value: Any, at: str) -> list[str]:
    """A list of strings, null items read as "" (go-yaml's null in a ``[]string``)."""
    if not isinstance(value, list) or not all(v is None or isinstance(v, str) for v in value):
        raise RuleError("expected a list of strings", at)
    return [v or "" for v in value]


def parse_rule(entry: Any, at: str) -> Rule:
    """One ``process_names`` entry (a mapping) as a :class:`Rule`."""
    if not isinstance(entry, dict):
        raise RuleError("expected a mapping with name, comm, exe or cmdline", at)
    warnings = [
        f"{at}.{key}: unknown key ignored, as process-exporter ignores it (a rule has "
        "cmdline, comm, exe and name)"
        for key in entry
        if key not in (*_SELECTORS, "name")
    ]
    if not any(entry.get(s) is not None for s in _SELECTORS):
        raise RuleError("no selector: give comm, exe or cmdline (all must match)", at)
    template = entry.get("name") or DEFAULT_TEMPLATE
    if not isinstance(template, str):
        raise RuleError("expected a string", f"{at}.name")
    comm = exe = cmdline = None
    if entry.get("comm") is not None:
        comm = frozenset(_strings(entry["comm"], f"{at}.comm"))
    if entry.get("exe") is not None:
        exes: dict[str, str] = {}
        for e in _strings(entry["exe"], f"{at}.exe"):
            exes[go_base(e) if "/" in e else e] = e if "/" in e else ""
        exe = tuple(exes.items())
    if entry.get("cmdline") is not None:
        patterns = []
        for i, source in enumerate(_strings(entry["cmdline"], f"{at}.cmdline")):
            try:
                patterns.append(compile_cmdline(source))
            except ValueError as err:
                raise RuleError(f"bad regex {source!r}: {err}", f"{at}.cmdline.{i}") from None
        cmdline = tuple(patterns)
    parts = compile_template(template, f"{at}.name")
    warnings += _warnings(parts, f"{at}.name")
    return Rule(template, parts, comm, exe, cmdline, tuple(warnings))


def parse_process_names(value: Any) -> tuple[Rule, ...]:
    """The ``process_names`` list of process-exporter's config as rules, in order; null is
    no rules, as to process-exporter."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise RuleError("expected a list of rules (name, comm, exe, cmdline)", "")
    return tuple(parse_rule(entry, str(i)) for i, entry in enumerate(value))
