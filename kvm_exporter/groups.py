"""process-exporter's ``process_names``: matchers and name templates, as its config says.

Semantics mirror ncabatoff/process-exporter (``config/config.go``, README "Using a config
file"): the rules are tried in order and the first whose selectors all match names the process.
``comm`` is a list of exact comm values (any may match); ``exe`` a list of argv[0] values,
where one without a slash matches argv[0]'s basename and one with a slash must equal argv[0];
``cmdline`` a list of regexes that must all be found in the arguments joined by spaces, their
named groups filling ``.Matches``. ``name`` (default ``{{.ExeBase}}``) is a Go-template subset:
literal text and the actions ``{{.Comm}}``, ``{{.ExeBase}}``, ``{{.ExeFull}}``,
``{{.Username}}`` and ``{{.Matches.NAME}}``. ``ExeBase``/``ExeFull`` come from argv[0], or from
comm when there are no arguments (a kernel process, or arguments that cannot be read).

Nothing here reads the system: :func:`parse_process_names` checks a config, :meth:`Rule.name_of`
names a process from what the caller read.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

DEFAULT_TEMPLATE = "{{.ExeBase}}"
FIELDS = ("Comm", "ExeBase", "ExeFull", "Username")
"""Template fields of one process that may name a group."""
PER_PROCESS = ("PID", "StartTime")
"""Fields process-exporter has that would make one group (one series) per process."""
NO_VALUE = "<no value>"
"""What Go's text/template prints for a ``.Matches`` key no regex captured."""

_ACTION = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_FIELD = re.compile(r"\.([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?")
_SELECTORS = ("comm", "exe", "cmdline")


class RuleError(ValueError):
    """A ``process_names`` entry is unusable; ``at`` names it (``2.name``: entry 2's name)."""

    def __init__(self, message: str, at: str) -> None:
        super().__init__(message)
        self.at = at


class Argv(NamedTuple):
    """What a rule may look at for one process. ``argv`` is called at most once, and only
    by a rule that needs it: it returns the arguments, or None if they cannot be read."""

    comm: str
    username: str
    argv: Callable[[], tuple[str, ...] | None]


Part = tuple[str, str]
"""One piece of a compiled template: ("text", literal), ("field", name), ("match", key)."""


@dataclass(frozen=True)
class Rule:
    """One ``process_names`` entry, checked and compiled."""

    template: str
    parts: tuple[Part, ...]
    comm: frozenset[str] | None
    exe: tuple[tuple[str, str], ...] | None
    """(basename, full path or "" for any path) per ``exe`` entry; a later one with the same
    basename replaces an earlier one, as in process-exporter's map."""
    cmdline: tuple[re.Pattern[str], ...] | None

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
                found = regex.search(joined)
                if found is None:
                    return None
                matches.update((k, v or "") for k, v in found.groupdict().items())
        exe_full = argv[0] if argv else proc.comm
        exe_base = go_base(exe_full) if argv else proc.comm
        values = {
            "Comm": proc.comm,
            "ExeBase": exe_base,
            "ExeFull": exe_full,
            "Username": proc.username,
        }
        out = []
        for kind, value in self.parts:
            if kind == "text":
                out.append(value)
            elif kind == "field":
                out.append(values[value])
            else:
                out.append(matches.get(value, NO_VALUE))
        return "".join(out)


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
    found = _FIELD.fullmatch(body)
    field, key = (found.group(1), found.group(2)) if found else (body, None)
    if field in PER_PROCESS and key is None:
        raise RuleError(
            f"{{{{.{field}}}}} would make a group, and a series, of every process: refused", at
        )
    if field == "Matches" and key is not None:
        return ("match", key)
    if found and key is None and field in FIELDS:
        return ("field", field)
    supported = ", ".join("{{." + f + "}}" for f in FIELDS) + ", {{.Matches.NAME}}"
    raise RuleError(f"unsupported template action {{{{{body}}}}} (supported: {supported})", at)


def _strings(value: Any, at: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RuleError("expected a list of strings", at)
    return value


def parse_rule(entry: Any, at: str) -> Rule:
    """One ``process_names`` entry (a mapping) as a :class:`Rule`."""
    if not isinstance(entry, dict):
        raise RuleError("expected a mapping with name, comm, exe or cmdline", at)
    for key in entry:
        if key not in (*_SELECTORS, "name"):
            raise RuleError("unknown key (expected one of cmdline, comm, exe, name)", f"{at}.{key}")
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
                patterns.append(re.compile(source))
            except re.error as err:
                raise RuleError(f"bad regex {source!r}: {err}", f"{at}.cmdline.{i}") from None
        cmdline = tuple(patterns)
    parts = compile_template(template, f"{at}.name")
    return Rule(template, parts, comm, exe, cmdline)


def parse_process_names(value: Any) -> tuple[Rule, ...]:
    """The ``process_names`` list of process-exporter's config as rules, in order."""
    if not isinstance(value, list):
        raise RuleError("expected a list of rules (name, comm, exe, cmdline)", "")
    return tuple(parse_rule(entry, str(i)) for i, entry in enumerate(value))
