"""process-exporter's process_names semantics (kvm_exporter/groups/rules.py) and the per-poll
naming and counting (kvm_exporter/groups/tracker.py), on records the tests make; the real
process-exporter side by side is in tests/test_groups_process_exporter.py."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import secrets
import shutil
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import wait_until

from kvm_exporter.aggregate import OTHER
from kvm_exporter.config import ConfigError, parse_config
from kvm_exporter.groups.rules import (
    Argv,
    Rule,
    RuleError,
    go_base,
    go_time,
    name_of,
    parse_process_names,
)
from kvm_exporter.groups.tracker import GroupCounts, Grouper, chosen_by_processes
from kvm_exporter.records import Survey, UsageSpec
from kvm_exporter.states import STATES


def rules(*entries: dict[str, Any]) -> tuple[Rule, ...]:
    return parse_process_names(list(entries))


def named(
    rs: tuple[Rule, ...], comm: str, argv: tuple[str, ...] | None, user: str = "alice"
) -> str | None:
    return name_of(rs, Argv(comm, user, lambda: argv))[0]


def test_default_name_is_argv0_basename_and_comm_without_arguments() -> None:
    rs = rules({"comm": ["postgres", "kworker/0:1"]})
    assert named(rs, "postgres", ("/usr/lib/postgresql/15/bin/postgres", "-D", "/x")) == "postgres"
    # A kernel thread has no arguments: ExeBase falls back to comm, as process-exporter's.
    assert named(rs, "kworker/0:1", ()) == "kworker/0:1"
    assert named(rs, "bash", ("bash",)) is None


def test_exe_without_slash_matches_the_basename_with_slash_the_whole_argv0() -> None:
    rs = rules({"exe": ["postgres", "/usr/local/bin/prometheus"], "name": "{{.ExeFull}}"})
    assert named(rs, "x", ("/opt/pg/bin/postgres",)) == "/opt/pg/bin/postgres"
    assert named(rs, "x", ("/usr/local/bin/prometheus", "--a")) == "/usr/local/bin/prometheus"
    assert named(rs, "x", ("/usr/bin/prometheus",)) is None  # same basename, other path
    assert named(rs, "postgres", ()) is None  # no argv[0], no exe match


def test_cmdline_regexes_all_must_match_the_arguments_joined_by_spaces() -> None:
    rs = rules(
        {
            "name": "{{.ExeBase}}:{{.Matches.Cfgfile}}:{{.Matches.Port}}",
            "cmdline": [r"-config\.path\s+(?P<Cfgfile>\S+)", r"(?:--port=(?P<Port>\d+))?$"],
        }
    )
    argv = ("/usr/bin/process-exporter", "-config.path", "/etc/pe.yml")
    assert named(rs, "process-exporte", argv) == "process-exporter:/etc/pe.yml:"
    assert named(rs, "process-exporte", ("/usr/bin/pe", "-config.path")) is None


# Go's RE2 (process-exporter's regexp) against Python's re, each case: pattern, arguments,
# the group name process-exporter gives (None: no match). Python's re gives another answer
# for every one of them, or refuses the pattern.
RE2_CASES = [
    (r"--id=(?P<m>[[:digit:]]+)", ("x", "--id=123"), "m=123"),
    (r"--id=(?P<m>[[:digit:]]+)", ("x", "--id=:]]"), None),
    (r"--n=(?P<m>\d+)", ("x", "--n=٣٤"), None),  # \d is ASCII
    (r"(?P<m>\w+)$", ("x", "naïve"), "m=ve"),  # \w is ASCII
    (r"(?P<m>x{,3}y)", ("x{,3}y",), "m=x{,3}y"),  # a literal, not a repeat
    (r"(?P<m>end)$", ("the end\n",), None),  # $ is the very end
    (r"(?P<m>\pL+)", ("1 Ωmega",), "m=Ωmega"),
    (r"(?P<m>\p{Greek}+)", ("omega Ωμ",), "m=Ωμ"),
    (r"(?P<m>a(?i)b)", ("aB",), "m=aB"),
    (r"(?U)(?P<m>a+)", ("aaa",), "m=a"),
    (r"(?P<m>end)\z", ("the end",), "m=end"),
    (r"(?P<m>\Q.*\E)", ("a.*b",), "m=.*"),
    (r"(?P<m>\x{41}+)", ("AA",), "m=AA"),
    # A repeated name: Go keeps every group, the last one's text wins ("" if it took no part).
    (r"(?P<m>x)|(?P<m>y)", ("y",), "m=y"),
    (r"(?P<m>x)|(?P<m>y)", ("x",), "m="),
    # An argument that is not UTF-8: each such byte is one U+FFFD to Go, "." matches it;
    # the name shows the byte as \xNN (process-exporter's invalid label makes it panic).
    (r"a(?P<m>.)b", ("a\udcffb",), "m=\\xff"),
]


@pytest.mark.parametrize(("pattern", "argv", "expected"), RE2_CASES)
def test_cmdline_regexes_are_gos_re2(
    pattern: str, argv: tuple[str, ...], expected: str | None
) -> None:
    rs = rules({"name": "m={{.Matches.m}}", "cmdline": [pattern]})
    assert named(rs, "x", argv) == expected


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("a(?=b)", "invalid perl operator: (?="),
        ("a(?!b)", "invalid perl operator: (?!"),
        ("(?<=a)b", "invalid perl operator: (?<="),
        (r"(a)\1", r"invalid escape sequence: \1"),
        ("a++", "bad repetition operator: ++"),
        ("(?>a)", "invalid perl operator: (?>"),
        ("a{1001}", "invalid repetition size: {1001}"),
        (r"\C", r"invalid escape sequence: \C"),  # RE2 C++ takes it, Go does not
        ("(?P<é>a)", "invalid named capture: (?P<é>"),  # so does RE2 C++, Go does not
        (r"\Z", r"invalid escape sequence: \Z"),
        ("[[:alphabet:]]", "invalid character class range: [:alphabet:]"),
    ],
)
def test_what_go_refuses_is_refused_with_the_reason(pattern: str, reason: str) -> None:
    with pytest.raises(RuleError) as err:
        rules({"comm": ["a"]}, {"cmdline": ["x", pattern]})
    assert err.value.at == "1.cmdline.1"
    assert str(err.value) == f"bad regex {pattern!r}: {reason}"


def test_the_same_rules_read_twice_are_equal() -> None:
    """A reload compares the new rules with the running ones: equal rules keep the groups and
    their counters, however many patterns RE2's own cache has seen meanwhile."""
    entries = [{"cmdline": [r"--role=(?P<role>\w+)"], "name": "{{.Matches.role}}"}]
    first = rules(*entries)
    for i in range(300):
        rules({"cmdline": [f"other{i}"]})
    assert rules(*entries) == first


def test_a_crafted_command_line_costs_linear_time() -> None:
    """Issue 23's freeze: under Python's re this one search ran 7-10 s."""
    rs = rules({"name": "java-{{.Matches.main}}", "cmdline": [r"java .*?(?P<main>[\w.]+)$"]})
    hostile = ("java " * 260 + "a" * 2700 + "!",)
    started = time.monotonic()
    for _ in range(3):
        assert named(rs, "java", hostile) is None
    assert time.monotonic() - started < 2.0  # measured: 3 microseconds each (re: 8 s each)


def test_a_match_key_no_regex_captured_prints_go_templates_no_value() -> None:
    rs = rules({"name": "{{.Comm}}-{{.Matches.nothere}}", "comm": ["sshd"]})
    assert named(rs, "sshd", ("sshd",)) == "sshd-<no value>"


def test_all_selectors_of_a_rule_must_match_and_the_first_matching_rule_wins() -> None:
    rs = rules(
        {"name": "both", "comm": ["python3"], "cmdline": ["worker"]},
        {"name": "{{.Username}}:{{.Comm}}", "comm": ["python3"]},
        {"name": "never", "comm": ["python3"]},
    )
    assert named(rs, "python3", ("python3", "worker.py")) == "both"
    assert named(rs, "python3", ("python3", "web.py"), user="bob") == "bob:python3"


def test_every_template_field_of_process_exporter_printed_as_go_prints_it() -> None:
    """PID, StartTime (UTC, Go's time.String), Cgroups ([]string) and Matches (a map, keys
    sorted, "" the whole match) as process-exporter's text/template prints them."""
    rs = rules(
        {
            "name": "{{.PID}}|{{.StartTime}}|{{.Cgroups}}|{{.Matches}}",
            "cmdline": [r"--role=(?P<role>\w+)"],
        }
    )
    proc = Argv("app", "u", lambda: ("app", "--role=web"), 4242, 1765123456.37, lambda: ("/", "/a"))
    assert name_of(rs, proc)[0] == (
        "4242|2025-12-07 16:04:16.37 +0000 UTC|[/ /a]|map[:--role=web role:web]"
    )
    assert go_time(1765123456.0) == "2025-12-07 16:04:16 +0000 UTC"
    assert go_time(0.9999999) == "1970-01-01 00:00:01 +0000 UTC"
    assert go_time(None) == "0001-01-01 00:00:00 +0000 UTC"  # Go's zero time
    assert named(rules({"name": "{{.Cgroups}}", "comm": ["a"]}), "a", ()) == "[]"


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("pre-{{.Foo}}-post", "pre-"),  # no such field: Go's execution stops there
        ("{{.Comm}}-{{.Comm.Size}}-x", "app-"),  # a string has no fields
        ("{{.Matches.role.x}}-x", "<empty>"),  # nor has a captured value: stops at once
        ("{{.Matches.nope.x}}-x", "<no value>-x"),  # a missing key's nothing goes on
        ("{{.comm}}", "<empty>"),  # unexported: no field either
    ],
)
def test_a_field_process_exporter_lacks_ends_the_name_there(template: str, expected: str) -> None:
    rs = rules({"name": template, "cmdline": [r"--role=(?P<role>\w+)"]})
    assert named(rs, "app", ("app", "--role=web")) == expected
    (warning,) = rs[0].warnings
    assert "is no field process-exporter has: names end before it" in warning


@pytest.mark.parametrize("field", ["PID", "StartTime"])
def test_a_group_per_process_is_allowed_with_a_warning_that_names_the_cost(field: str) -> None:
    (rule,) = rules({"name": f"x-{{{{.{field}}}}}", "comm": ["a"]})
    assert rule.warnings == (
        f"0.name: {{{{.{field}}}}} makes a group of every process it names: a series each in "
        "every group metric, up to max_series, past which the smallest fold into other",
    )


def test_a_group_per_process_stays_under_the_series_cap() -> None:
    rs = rules({"name": "pid-{{.PID}}", "comm": ["w"]})
    got = Groups(rs, Argvs({}), cap=40).update([proc(pid, 1, "w") for pid in range(2, 102)])
    assert sum(got.processes.values()) == 100
    assert len(got.processes) < 40 and got.processes[OTHER] > 60 and got.folded > 60
    assert "pid-2" in got.processes or "pid-101" in got.processes  # named, each its own


def test_names_a_process_controls_stay_apart_and_never_empty() -> None:
    """Two comms that differ only in bytes that are not UTF-8 stay two groups (shown as
    \\xNN, not both U+FFFD); an empty comm under {{.Comm}} is a visible group."""
    rs = rules({"name": "{{.Comm}}", "cmdline": ["."]})
    records = [proc(2, 1, "a"), proc(3, 1, "a"), proc(4, 1, "a")]
    for i, comm in enumerate((b"x\xff", b"x\xfe", b"")):
        records[i] = records[i][: -ROW.size] + ROW.pack(*ROW.unpack(records[i])[:-1], comm)
    got = Groups(rs, Argvs({2: ("a",), 3: ("a",), 4: ("a",)})).update(records)
    assert got.processes == {"x\\xff": 1, "x\\xfe": 1, "<empty>": 1}


def test_template_trim_markers_and_spaces_inside_actions() -> None:
    rs = rules({"name": "a {{- .Comm -}} b{{ .Username }}", "comm": ["x"]})
    assert named(rs, "x", ("x",), user="u") == "axbu"


def test_argv_is_read_only_for_a_rule_that_needs_it() -> None:
    reads: list[int] = []

    def argv() -> tuple[str, ...]:
        reads.append(1)
        return ("/bin/sh",)

    comm_only = rules({"name": "{{.Comm}}", "comm": ["sh"]}, {"cmdline": ["."]})
    assert name_of(comm_only, Argv("sh", "u", argv)) == ("sh", False)
    assert reads == []
    assert name_of(comm_only, Argv("ksh", "u", argv)) == ("sh", False)
    assert reads == [1]


def test_unreadable_arguments_match_as_none_and_are_reported() -> None:
    rs = rules({"exe": ["nginx"]}, {"name": "{{.ExeBase}}", "comm": ["nginx"]})
    assert name_of(rs, Argv("nginx", "u", lambda: None)) == ("nginx", True)


@pytest.mark.parametrize(
    ("entry", "at", "message"),
    [
        ({"name": "{{.StartTime.Unix}}", "comm": ["a"]}, "0.name", "methods of a time"),
        ({"name": '{{printf "%d" .PID}}', "comm": ["a"]}, "0.name", "unsupported template"),
        ({"name": "{{if .Comm}}x{{end}}", "comm": ["a"]}, "0.name", "unsupported"),
        ({"name": "{{.Comm", "comm": ["a"]}, "0.name", "unclosed action"),
        ({"name": "x"}, "0", "no selector"),
        ({"comm": "a"}, "0.comm", "expected a list of strings"),
        ({"cmdline": ["("]}, "0.cmdline.0", "bad regex '('"),
    ],
)
def test_bad_rules_are_refused_naming_the_entry(entry: Any, at: str, message: str) -> None:
    with pytest.raises(RuleError) as err:
        parse_process_names([entry])
    assert err.value.at == at
    assert message in str(err.value)


def test_go_filepath_base() -> None:
    assert [go_base(p) for p in ("", "/", "//", "a/b/", "/usr/bin/x", "x")] == [
        ".",
        "/",
        "/",
        "b",
        "x",
        "x",
    ]


def test_config_takes_rules_inline_or_from_process_exporters_file(tmp_path: Any) -> None:
    inline = parse_config("groups:\n  children: false\n  process_names:\n    - comm: [a]\n")
    assert len(inline.groups.process_names) == 1 and inline.groups.children is False
    pe = tmp_path / "pe.yml"
    pe.write_text("process_names:\n  - name: '{{.Comm}}'\n    comm: [b]\n")
    from_file = parse_config(f"groups:\n  config_file: {pe}\n")
    assert from_file.groups.process_names == parse_process_names(
        [{"name": "{{.Comm}}", "comm": ["b"]}]
    )
    assert parse_config("").groups.process_names == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "groups:\n  process_names:\n    - {name: '{{.Comm | len}}', comm: [a]}\n",
            "cfg.yml: groups.process_names.0.name: unsupported template action {{.Comm | len}}",
        ),
        (
            "groups:\n  process_names: [{comm: [a]}]\n  config_file: /x.yml\n",
            "cfg.yml: groups: give process_names or config_file, not both",
        ),
        (
            "groups:\n  config_file: /nonexistent/pe.yml\n",
            "/nonexistent/pe.yml: cannot read process-exporter config file",
        ),
    ],
)
def test_bad_groups_config_is_one_line_naming_file_and_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "cfg.yml")
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("inline", [True, False])
def test_rules_are_read_as_leniently_as_process_exporter_reads_them(
    tmp_path: Any, caplog: pytest.LogCaptureFixture, inline: bool
) -> None:
    """Unknown keys in a rule are ignored (one warning each, naming the file and the rule);
    scalars are the text written, as go-yaml gives a Go string (PyYAML: True, 1234, 1.5)."""
    rules_text = (
        "  - {name: 123, comm: [yes, 1234, 1.50, ~], cgroup: [/system.slice], pid: 1}\n"
        "  - {name: on, exe: [0x1F]}\n"
    )
    pe = tmp_path / "pe.yml"
    pe.write_text("process_names:\n" + rules_text)
    text = (
        "groups:\n  process_names:\n" + rules_text.replace("  -", "    -")
        if inline
        else f"groups:\n  config_file: {pe}\n"
    )
    with caplog.at_level(logging.WARNING):
        rs = parse_config(text, "cfg.yml").groups.process_names
    for comm in ("yes", "1234", "1.50", ""):
        assert named(rs, comm, ("x",)) == "123"
    assert named(rs, "True", ("x",)) is None
    assert named(rs, "x", ("/bin/0x1F",)) == "on"
    at = "cfg.yml: groups.process_names.0" if inline else f"{pe}: process_names.0"
    assert [r.getMessage() for r in caplog.records] == [
        f"{at}.{key}: unknown key ignored, as process-exporter ignores it (a rule has cmdline, "
        "comm, exe and name)"
        for key in ("cgroup", "pid")
    ]


@pytest.mark.parametrize("text", ["", "process_names:\n", "process_names: []\n", "other: 1\n"])
def test_a_process_exporter_file_without_rules_names_no_groups(tmp_path: Any, text: str) -> None:
    pe = tmp_path / "pe.yml"
    pe.write_text(text)
    assert parse_config(f"groups:\n  config_file: {pe}\n").groups.process_names == ()


def test_an_error_in_process_exporters_file_names_that_file(tmp_path: Any) -> None:
    pe = tmp_path / "pe.yml"
    pe.write_text("process_names:\n  - cmdline: ['(?P<x']\n")
    with pytest.raises(ConfigError) as err:
        parse_config(f"groups:\n  config_file: {pe}\n", "cfg.yml")
    assert str(err.value).startswith(f"{pe}: process_names.0.cmdline.0: bad regex")


ROW = struct.Struct("=10q16s")
"""Usage records as the tests write them: no counters, the state an index of STATES."""
SPEC = UsageSpec(
    page_size=1,
    counters=(),
    decode=ROW.unpack,
    state=STATES.__getitem__,
    start_time=lambda start, _: None if start < 0 else float(start),  # -1: unknown
)


def proc(
    pid: int,
    ppid: int,
    comm: str,
    start: int = 1,
    state: str = "sleeping",
    threads: int = 1,
    rss_bytes: int = 4096,
    vsize_bytes: int = 8192,
    uid: int = 1000,
) -> bytes:
    """A process's usage record (no jail)."""
    fields = (pid, start, 0, uid, 0, rss_bytes, vsize_bytes, ppid, threads, STATES.index(state))
    return ROW.pack(*fields, comm.encode())


class Argvs:
    """A source's argv(): answers from a table and counts its reads."""

    def __init__(self, table: dict[int, tuple[str, ...] | None]) -> None:
        self.table = table
        self.reads: list[int] = []

    def __call__(self, pid: int) -> tuple[str, ...] | None:
        self.reads.append(pid)
        return self.table.get(pid)


class Groups:
    """A Grouper over the test's records, polled with a list of them."""

    def __init__(
        self, rs: tuple[Rule, ...], argvs: Argvs, children: bool = True, cap: int = 100
    ) -> None:
        self._grouper = Grouper(rs, children, cap, argvs, str, SPEC)

    def update(self, procs: list[bytes]) -> GroupCounts:
        return self._grouper.update(Survey({}, procs, 0))


def test_children_join_the_nearest_named_ancestor_unless_named_themselves() -> None:
    rs = rules(
        {"name": "web", "cmdline": ["^nginx: master"]},
        {"name": "{{.Comm}}", "comm": ["perl"]},
    )
    argvs = Argvs({10: ("nginx: master",), 11: ("nginx: worker",), 13: ("perl",)})
    procs = [
        proc(1, 0, "init"),
        proc(10, 1, "nginx"),
        proc(11, 10, "nginx"),  # a worker: joins its parent
        proc(12, 11, "sh"),  # grandchild via an unnamed new parent
        proc(13, 12, "perl"),  # named itself: its own group
        proc(14, 13, "cat"),  # child of the perl group
        proc(20, 1, "cron"),  # parent init is unnamed: out
    ]
    got = Groups(rs, argvs).update(procs)
    assert got.processes == {"web": 3, "perl": 2}
    without = Groups(rs, Argvs(argvs.table), children=False).update(procs)
    assert without.processes == {"web": 1, "perl": 1}


def test_a_new_child_joins_the_group_its_parent_got_in_an_earlier_poll() -> None:
    rs = rules({"name": "web", "comm": ["nginx"]})
    g = Groups(rs, Argvs({}))
    assert g.update([proc(10, 1, "nginx"), proc(20, 1, "cron")]).processes == {"web": 1}
    # Next poll: a worker of the unchanged master, one of the master's after its record
    # changed, and a child of pid 20, which is now another, new process of no group.
    got = g.update(
        [
            proc(10, 1, "nginx", rss_bytes=8192),
            proc(11, 10, "sh"),
            proc(12, 11, "worker"),
            proc(20, 1, "cron", start=7),
            proc(21, 20, "sh"),
        ]
    )
    assert got.processes == {"web": 3}
    got = g.update([proc(10, 1, "nginx", rss_bytes=8192), proc(13, 10, "sh")])
    assert got.processes == {"web": 2} and got.resident_bytes == {"web": 8192 + 4096}


def test_arguments_are_read_once_per_process_and_again_after_pid_reuse() -> None:
    rs = rules({"name": "{{.ExeBase}}", "cmdline": ["."]})
    argvs = Argvs({5: ("/usr/bin/app",), 6: None})
    g = Groups(rs, argvs)
    first = g.update([proc(5, 1, "app"), proc(6, 1, "gone")])
    for _ in range(3):
        again = g.update([proc(5, 1, "app"), proc(6, 1, "gone")])
    assert sorted(argvs.reads) == [5, 6]  # a steady state reads nothing more
    assert first.processes == again.processes == {"app": 1}  # "." never matches an empty line
    assert again.unreadable == 1
    argvs.table[5] = ("/usr/bin/other",)
    reused = g.update([proc(5, 1, "other", start=99)])  # same pid, a new process
    assert sorted(argvs.reads) == [5, 5, 6]
    assert reused.processes == {"other": 1, "app": 0}  # app's process is gone: app at 0


def test_an_unreadable_process_is_counted_under_its_comm() -> None:
    rs = rules({"name": "{{.ExeBase}}", "comm": ["zomb"]})
    got = Groups(rs, Argvs({})).update([proc(7, 1, "zomb", state="zombie", threads=0)])
    assert got.processes == {"zomb": 1}
    assert got.threads == {"zomb": 1}  # a zombie has no threads; it counts as one, as kvm_threads
    assert got.states == {("zomb", "zombie"): 1}
    assert got.unreadable == 1


def test_per_group_values() -> None:
    rs = rules({"name": "{{.Comm}}", "comm": ["a", "b"]})
    procs = [
        proc(2, 1, "a", start=50, threads=3, rss_bytes=100, vsize_bytes=1000),
        proc(3, 1, "a", start=40, state="running", rss_bytes=10, vsize_bytes=20),
        proc(4, 1, "b", start=-1),
    ]
    got = Groups(rs, Argvs({})).update(procs)
    assert got.processes == {"a": 2, "b": 1}
    assert got.threads == {"a": 4, "b": 1}
    assert got.resident_bytes == {"a": 110, "b": 4096}
    assert got.virtual_bytes == {"a": 1020, "b": 8192}
    assert got.oldest_start == {"a": 40.0}  # b's start is unknown (a crash dump)
    assert got.states == {("a", "sleeping"): 1, ("a", "running"): 1, ("b", "sleeping"): 1}


def test_a_hostile_user_cannot_grow_groups_past_the_cap() -> None:
    """Each process names its own group through a capture of its arguments."""
    rs = rules({"name": "job-{{.Matches.id}}", "cmdline": [r"--id=(?P<id>\S+)"]})
    cap = 20
    table: dict[int, tuple[str, ...] | None] = {10: ("app", "--id=main")}
    procs = [proc(10 + i, 1, "app") for i in range(5)]  # the real service, 5 processes
    table.update({10 + i: ("app", "--id=main") for i in range(5)})
    for i in range(1000):
        table[100 + i] = ("evil", f"--id={i}")
        procs.append(proc(100 + i, 1, "evil", state="running" if i % 2 else "sleeping"))
    got = Groups(rs, Argvs(table), cap=cap).update(procs)
    assert len(got.processes) <= cap and len(got.states) <= cap
    assert got.processes["job-main"] == 5  # the biggest group keeps its name
    assert sum(got.processes.values()) == 1005  # folding loses no process
    assert got.folded == 1001 - (len(got.processes) - 1)


@pytest.mark.parametrize(
    ("entry", "chosen"),
    [
        ({"name": "web", "cmdline": ["x"]}, False),
        ({"name": "{{.Comm}}", "comm": ["a", "b"]}, False),  # one of the admin's comms
        ({"name": "{{.Comm}}", "cmdline": ["x"]}, True),
        ({"comm": ["python3"]}, True),  # ExeBase by default: argv[0] is the process's
        ({"exe": ["postgres"]}, False),
        ({"name": "{{.ExeFull}}", "exe": ["postgres"]}, True),  # any path
        ({"name": "{{.ExeFull}}", "exe": ["/usr/bin/postgres"]}, False),
        ({"name": "{{.Username}}", "comm": ["sshd"]}, True),  # subordinate uids
        ({"name": "j-{{.Matches.id}}", "cmdline": ["(?P<id>a|b)"]}, True),
    ],
)
def test_which_rules_names_the_processes_choose(entry: dict[str, Any], chosen: bool) -> None:
    assert chosen_by_processes(rules(entry)[0]) is chosen


def test_a_name_flood_folds_only_its_own_rules_share() -> None:
    """1,000 processes each name their own group through a capture of their arguments, from
    the first rule. The admin's single-process groups (a literal name, a comm of the admin's
    list, an exe basename), whose names sort after the flood's, keep theirs; the two other
    rules whose names processes choose (a user's, another capture) keep their share."""
    rs = rules(
        {"name": "app-{{.Matches.app}}", "cmdline": [r"--app=(?P<app>\S+)"]},
        {"name": "zz-fixed", "comm": ["svc"]},
        {"name": "{{.Comm}}", "comm": ["zz-daemon"]},
        {"exe": ["zz-exe"]},
        {"name": "zz-{{.Username}}", "comm": ["shell"]},
        {"name": "zz-job-{{.Matches.n}}", "cmdline": [r"^job (?P<n>\d)"]},
    )
    table: dict[int, tuple[str, ...] | None] = {i: ("evil", f"--app=a{i:04}") for i in range(1000)}
    procs = [proc(i, 1, "evil", start=5) for i in range(1000)]
    admin = [proc(2001, 1, "svc"), proc(2002, 1, "zz-daemon"), proc(2003, 1, "x")]
    table[2003] = ("/opt/zz-exe",)
    users = [proc(2100 + u, 1, "shell", uid=u) for u in range(3)]
    jobs = [proc(2200 + n, 1, "job") for n in range(3)]
    table.update({2200 + n: ("job", str(n)) for n in range(3)})
    got = Groups(rs, Argvs(table), cap=40).update(procs + admin + users + jobs)
    assert len(got.processes) <= 40 and len(got.states) <= 40
    for name in ("zz-fixed", "zz-daemon", "zz-exe", "zz-0", "zz-1", "zz-2"):
        assert got.processes[name] == 1, name
    assert {"zz-job-0", "zz-job-1", "zz-job-2"} <= set(got.processes)
    flood = [name for name in got.processes if name.startswith("app-")]
    assert flood and got.processes["other"] == 1000 - len(flood)


def test_shares_are_equal_and_what_one_rule_leaves_goes_to_the_others() -> None:
    """Two floods from two rules: each keeps the same number of groups; with room for 20
    groups beside other and a third rule of 2 groups, the two floods keep 9 each."""
    rs = rules(
        {"name": "a-{{.Matches.n}}", "cmdline": [r"^a (?P<n>\d+)"]},
        {"name": "b-{{.Matches.n}}", "cmdline": [r"^b (?P<n>\d+)"]},
        {"name": "c-{{.Matches.n}}", "cmdline": [r"^c (?P<n>\d+)"]},
    )
    table: dict[int, tuple[str, ...] | None] = {}
    procs = []
    for flood, count in (("a", 300), ("b", 50), ("c", 2)):
        for i in range(count):
            pid = len(procs) + 10
            table[pid] = (flood, str(i))
            procs.append(proc(pid, 1, flood))
    got = Groups(rs, Argvs(table), cap=len(STATES) + 20).update(procs)
    kept = Counter(name[0] for name in got.processes if name != "other")
    assert kept == {"a": 9, "b": 9, "c": 2}


def test_in_a_share_a_running_service_outranks_newcomers_of_its_size() -> None:
    """Under the default ``{{.ExeBase}}`` of a ``comm`` rule, processes choose their names:
    the flood's newcomers, one process each like the service, fold before it."""
    rs = rules({"comm": ["python3"]})
    table: dict[int, tuple[str, ...] | None] = {2: ("/usr/bin/zz-service",)}
    table.update({10 + i: (f"a{i}",) for i in range(100)})
    procs = [proc(2, 1, "python3", start=1)]
    procs += [proc(10 + i, 1, "python3", start=50) for i in range(100)]
    got = Groups(rs, Argvs(table), cap=30).update(procs)
    assert got.processes["zz-service"] == 1 and got.processes["other"] > 80


@pytest.fixture
def own_groups() -> Iterator[str]:
    """30 real processes whose arguments each ask for a group of their own: the rules."""
    token = "h" + secrets.token_hex(4)
    kids = [subprocess.Popen(["bash", "-c", f"exec -a {token}-{i} sleep 600"]) for i in range(30)]
    try:
        yield f"[{{name: 'g-{{{{.Matches.n}}}}', cmdline: ['^{token}-(?P<n>\\d+) 600$']}}]"
    finally:
        for kid in kids:
            kid.kill()
            kid.wait()


def group_processes(
    metrics: dict[tuple[str, frozenset[tuple[str, str]]], float],
) -> dict[str, float]:
    return {dict(k)["group"]: v for (n, k), v in metrics.items() if n == "kvm_namegroup_processes"}


def test_live_processes_naming_their_own_groups_fold_under_the_cap(
    exporter: Any, own_groups: str
) -> None:
    e = exporter(f"interval: 0\nmax_series: 14\ngroups:\n  process_names: {own_groups}\n")
    seen = wait_until(
        lambda: sum(group_processes(e.metrics()).values()) == 30 and group_processes(e.metrics()),
        what="30 processes",
    )
    assert len(seen) <= 14 and seen["other"] >= 30 - 13
    assert e.metrics()["kvm_namegroup_folded_groups", frozenset()] == 30 - (len(seen) - 1)


@contextlib.contextmanager
def started(executable: str, *argvs: list[str]) -> Iterator[None]:
    """Real processes of ``executable``, one per argv (argv[0] as given), killed at the end."""
    kids: list[subprocess.Popen[bytes]] = []
    try:
        for argv in argvs:
            kids.append(subprocess.Popen(argv, executable=executable))
        yield
    finally:
        for kid in kids:
            kid.kill()
            kid.wait()


def cpu_series(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> dict[Any, float]:
    return {k: v for (n, k), v in metrics.items() if n == "kvm_namegroup_cpu_seconds_total"}


def test_live_name_flood_keeps_the_admins_groups_and_no_counter_jumps(
    exporter: Any, tmp_path: Any
) -> None:
    """A spinner names its group through ``--app=``, beside the admin's two single-process
    services. Then 200 processes under the same rule make 100 groups of two: the spinner's
    group folds into other, the admin's keep their names, and no counter series, between two
    scrapes, goes down or grows by more than the CPU time the machine had (a folded group's
    total carried into other would)."""
    token = "f" + secrets.token_hex(3)
    sleep = shutil.which("sleep") or "/bin/sleep"
    (tmp_path / f"zz{token}").symlink_to(sleep)  # a comm of the admin's list
    rules = (
        f"[{{name: 'app-{{{{.Matches.app}}}}', cmdline: ['^{token} --app=(?P<app>\\S+)']}},"
        f" {{name: zz-svc, cmdline: ['^{token}-svc ']}},"
        f" {{name: '{{{{.Comm}}}}', comm: [zz{token}]}}]"
    )
    config = f"interval: 0\nmax_series: 40\ngroups:\n  process_names: {rules}\n"
    admin = {"zz-svc", f"zz{token}"}
    spin = ["-c", "while :; do :; done"]
    with (
        started(sleep, [f"{token}-svc", "600"]),
        started(str(tmp_path / f"zz{token}"), ["x", "600"]),
        started("/bin/bash", [f"{token} --app=zspin", *spin]),
    ):
        e = exporter(config)
        spinner = frozenset({("group", "app-zspin"), ("mode", "user")})
        wait_until(lambda: cpu_series(e.metrics()).get(spinner, 0) >= 0.5, what="0.5 s of CPU")
        last: dict[Any, tuple[float, float]] = {}  # series: value, time of the scrape before

        def scrape() -> dict[str, float]:
            before = time.monotonic()
            metrics = e.metrics()
            for series, value in cpu_series(metrics).items():
                was, since = last.get(series, (0.0, 0.0))
                if since:
                    allowed = (time.monotonic() - since) * (os.cpu_count() or 1) + 0.05
                    assert was <= value <= was + allowed, (series, was, value)
                last[series] = (value, before)
            return group_processes(metrics)

        scrape()
        flood = [[f"{token} --app=a{i // 2:03}", "600"] for i in range(200)]
        with started(sleep, *flood):
            for _ in range(12):
                groups = scrape()
        assert len(groups) <= 40 // 2 and admin <= set(groups)
        assert "app-zspin" not in groups  # each flood group has 2 processes, the rest other
        assert groups["other"] == 201 - 2 * (len(groups) - 1 - len(admin))
        assert {dict(k)["group"] for k in last} >= {"app-zspin", "other"}


def test_process_exporters_names_stay_under_the_cap_too(exporter: Any, own_groups: str) -> None:
    """process-exporter's names show each group in each of its 5 states: the groups kept must
    leave room for that (with room for 2 per group, 19 groups would make 95 series of 40)."""
    config = "interval: 0\nmax_series: 40\ncompat: [process_exporter]\n"
    e = exporter(config + f"groups:\n  process_names: {own_groups}\n")
    wait_until(lambda: sum(group_processes(e.metrics()).values()) == 30, what="30 processes")
    series: dict[str, int] = {}
    for name, _ in e.metrics():
        if name.startswith(("kvm_namegroup_", "namedprocess_namegroup_")):
            series[name] = series.get(name, 0) + 1
    assert series["namedprocess_namegroup_states"] > 5  # more than one group: some were kept
    assert max(series.values()) <= 40, series


def test_group_counters_under_both_names() -> None:
    from prometheus_client.core import Metric

    from kvm_exporter.groups.families import kvm_metrics, process_exporter_metrics

    counters = {
        ("cpu", "user"): {"web": 1.5},
        ("cpu", "system"): {"web": 0.5},
        ("page_faults", "major"): {"web": 3.0},
        ("context_switches", "involuntary"): {"web": 7.0},
        ("block_operations", "in"): {"web": 2.0},
    }
    groups = GroupCounts({"web": 1}, {"web": 1}, {}, {}, {}, {}, 0, 0, counters)

    def samples(families: Any) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        out = {}
        for family in families:
            assert isinstance(family, Metric)
            for s in family.samples:
                out[s.name, frozenset(s.labels.items())] = s.value
        return out

    ours = samples(kvm_metrics(groups))
    assert ours["kvm_namegroup_cpu_seconds_total", frozenset({("group", "web"), ("mode", "user")})]
    assert (
        ours[
            "kvm_namegroup_block_operations_total",
            frozenset({("group", "web"), ("direction", "in")}),
        ]
        == 2.0
    )
    theirs = samples(process_exporter_metrics(groups))
    cpu = "namedprocess_namegroup_cpu_seconds_total"
    assert theirs[cpu, frozenset({("groupname", "web"), ("mode", "system")})] == 0.5
    assert theirs[
        "namedprocess_namegroup_major_page_faults_total", frozenset({("groupname", "web")})
    ]
    switches = "namedprocess_namegroup_context_switches_total"
    key = frozenset({("groupname", "web"), ("ctxswitchtype", "nonvoluntary")})
    assert theirs[switches, key] == 7.0
    assert not any("block" in name for name, _ in theirs)  # operations are not its bytes


def test_thread_states_are_read_only_for_named_processes_of_two_threads_or_more() -> None:
    rs = rules({"name": "{{.Comm}}", "comm": ["a", "b"]})
    table = {2: ["sleeping"] * 4 + ["running"], 5: ["sleeping"]}
    reads: list[int] = []

    def threads(pid: int) -> list[str] | None:
        reads.append(pid)
        return table.get(pid)

    grouper = Grouper(rs, True, 100, Argvs({}), str, SPEC, 5, thread_states=threads)
    procs = [proc(2, 1, "a", threads=5), proc(3, 1, "b"), proc(4, 1, "c", threads=3)]
    procs.append(proc(5, 1, "b", threads=2))  # one thread left by the time it is read
    got = grouper.update(Survey({}, procs, 0))
    assert got.thread_states == {("a", "sleeping"): 4, ("a", "running"): 1}
    assert sorted(reads) == [2, 5]
    # pid 2 exits and a single-threaded process takes its pid; pid 5 exits.
    got = grouper.update(Survey({}, [proc(2, 1, "b", start=9), proc(3, 1, "b")], 0))
    assert got.thread_states == {} and sorted(reads) == [2, 5]


def test_a_long_chain_of_new_unnamed_processes_all_join_the_named_ancestor() -> None:
    rs = rules({"name": "root", "comm": ["top"]})
    procs = [proc(2, 1, "top")] + [proc(3 + i, 2 + i, "sh") for i in range(20000)]
    got = Groups(rs, Argvs({})).update(list(reversed(procs)))
    assert got.processes == {"root": 20001}


def test_a_spinning_groups_cpu_counter_grows_under_both_names(exporter: Any) -> None:
    token = "c" + secrets.token_hex(4)
    spin = subprocess.Popen(["bash", "-c", f"exec -a {token} bash -c 'while :; do :; done'"])
    try:
        rules = f"[{{name: spinner, cmdline: ['^{token}']}}]"
        e = exporter(
            f"interval: 0\ncompat: [process_exporter]\ngroups:\n  process_names: {rules}\n"
        )
        ours = (
            "kvm_namegroup_cpu_seconds_total",
            frozenset({("group", "spinner"), ("mode", "user")}),
        )
        theirs = (
            "namedprocess_namegroup_cpu_seconds_total",
            frozenset({("groupname", "spinner"), ("mode", "user")}),
        )
        first = e.metrics()
        assert first[ours] == first[theirs]
        wait_until(lambda: e.metrics()[ours] >= first[ours] + 0.2, what="0.2 s of user CPU")
        later = e.metrics()
        assert later[theirs] == later[ours]  # one snapshot, two names
    finally:
        spin.kill()
        spin.wait()


CPU_TICKS = struct.Struct("=4q")
COUNTED = struct.Struct(ROW.format + "4q")
"""Usage records with two counters (:data:`ROW`, then user and system CPU ticks, then the same
of reaped children)."""
COUNTED_SPEC = SPEC._replace(
    counters=(("cpu", "user", 1.0), ("cpu", "system", 1.0)), decode=COUNTED.unpack
)


def counted(
    pid: int,
    ppid: int,
    comm: str,
    user: int,
    start: int = 1,
    state: str = "sleeping",
    uid: int = 1000,
) -> bytes:
    """A process's usage record with its CPU ticks (system: a tenth of user)."""
    record = proc(pid, ppid, comm, start, state, rss_bytes=1, vsize_bytes=1, uid=uid)
    return record + CPU_TICKS.pack(user, user // 10, 0, 0)


def test_a_counter_metric_with_two_values_per_group_stays_under_the_cap() -> None:
    rs = rules({"name": "{{.Comm}}", "comm": [f"c{i}" for i in range(150)]})
    grouper = Grouper(rs, True, 100, Argvs({}), str, COUNTED_SPEC)
    got = grouper.update(Survey({}, [counted(10 + i, 1, f"c{i}", 0) for i in range(150)], 5))
    cpu_series = sum(len(got.counters["cpu", mode]) for mode in ("user", "system"))
    assert cpu_series <= 100 and len(got.processes) <= 100 and len(got.states) <= 100
    assert sum(got.processes.values()) == 150


def test_a_reused_pid_joins_its_new_parents_group_and_no_counter_drops_or_jumps() -> None:
    """Between two polls, pid 30 (group app) exits and a child of web's master takes its pid;
    web's master meanwhile changes state, uid and comm (an exec): it stays in web."""
    rs = rules({"name": "web", "comm": ["nginx"]}, {"name": "app", "comm": ["app"]})
    grouper = Grouper(rs, True, 100, Argvs({}), str, COUNTED_SPEC)

    def poll(clock: int, *records: bytes) -> GroupCounts:
        return grouper.update(Survey({}, list(records), clock))

    first = poll(100, counted(10, 1, "nginx", 500), counted(30, 1, "app", 900))
    assert first.counters["cpu", "user"] == {"web": 0.0, "app": 0.0}  # the baseline
    second = poll(
        110,
        counted(10, 1, "perl", 520, state="running", uid=0),  # +20 ticks, same process
        counted(30, 10, "sh", 7, start=105),  # born after the first poll: all of it counts
    )
    assert second.processes == {"web": 2, "app": 0}  # app's last process is gone: 0, kept
    assert second.states == {("web", "running"): 1, ("web", "sleeping"): 1}
    assert second.counters["cpu", "user"] == {"web": 27.0, "app": 0.0}
    third = poll(120, counted(10, 1, "perl", 530), counted(30, 10, "sh", 9, start=105))
    assert third.counters["cpu", "user"] == {"web": 39.0, "app": 0.0}
    back = poll(130, counted(10, 1, "perl", 530), counted(31, 1, "app", 1, start=125))
    assert back.counters["cpu", "user"] == {"web": 39.0, "app": 1.0}  # app goes on from 0


def test_the_oldest_start_moves_on_when_the_oldest_process_exits() -> None:
    rs = rules({"name": "g", "comm": ["a"]})
    g = Groups(rs, Argvs({}))
    both = [proc(2, 1, "a", start=40), proc(3, 1, "a", start=50, state="running")]
    assert g.update(both).oldest_start == {"g": 40.0}
    assert g.update(both[1:]).oldest_start == {"g": 50.0}
    assert g.update([proc(3, 1, "a", start=50), proc(2, 1, "a", start=60)]).oldest_start == {
        "g": 50.0
    }


def test_group_counters_never_go_down_as_groups_fold_and_come_back() -> None:
    """Nine groups, room for three of their own; processes come and go, and each group's
    counter, while it is served, only grows."""
    rs = rules({"name": "{{.Comm}}", "comm": list("abcdefghi")})
    grouper = Grouper(rs, True, len(STATES) + 3, Argvs({}), str, COUNTED_SPEC)
    rng = random.Random(5)
    procs: dict[int, list[Any]] = {}  # pid: [comm, start, ticks]
    last: dict[str, float] = {}
    served = dict.fromkeys("abcdefghi", "")
    for clock in range(100, 1100, 10):
        for pid in list(procs):
            if rng.random() < 0.2:
                del procs[pid]
            else:
                procs[pid][2] += rng.randrange(10)
        for _ in range(rng.randrange(8)):
            procs[clock * 10 + len(procs)] = [rng.choice("abcdefghi"), clock, rng.randrange(10)]
        records = [counted(pid, 1, c, t, start=s) for pid, (c, s, t) in procs.items()]
        got = grouper.update(Survey({}, records, clock))
        for group, total in got.counters["cpu", "user"].items():
            assert total >= last.get(group, 0.0), (group, total, last[group])
            last[group] = total
        for group in served:
            served[group] += "k" if group in got.counters["cpu", "user"] else "-"
    assert any("k" in h[h.index("k-") + 1 :] for h in served.values() if "k-" in h)


def test_crafted_command_lines_of_live_processes_keep_polls_and_scrapes_fast(
    exporter: Any,
) -> None:
    """Issue 23's freeze, live: three processes whose command line made each Python re
    search run 7-10 s (scrapes took 8-19 s, kvm_up 0). Under RE2 the poll and every scrape
    stay at their normal cost."""
    token = "k" + secrets.token_hex(4)
    hostile = ["java"] * 259 + ["a" * 2700 + "!"]
    nap = f"import time; time.sleep(3600)  # {token}"
    started = [
        subprocess.Popen(["java", "-c", nap, *hostile], executable=sys.executable) for _ in range(3)
    ]
    try:
        ours = exporter(
            "interval: 1\ngroups:\n  process_names:\n"
            "    - name: 'java-{{.Matches.main}}'\n"
            "      cmdline: ['java .*?(?P<main>[\\w.]+)$']\n"
            f"    - name: '{token}'\n      cmdline: ['{token}']\n"
        )
        slowest = 0.0
        for _ in range(10):
            began = time.monotonic()
            metrics = ours.metrics()
            slowest = max(slowest, time.monotonic() - began)
            time.sleep(0.3)
        processes = {
            dict(k)["group"]: v
            for (n, k), v in metrics.items()
            if n.endswith("_processes") and "group" in dict(k)
        }
        assert processes[token] == 3  # seen, and no java- rule matched them
        assert metrics["kvm_poll_duration_seconds", frozenset({("collector", "groups")})] < 1.0
        assert metrics["kvm_up", frozenset()] == 1
        assert slowest < 2.0  # measured: a few ms; before: 8-19 s
    finally:
        for p in started:
            p.kill()
            p.wait()


RENAME = """
import ctypes, sys, time
ctypes.CDLL(None).prctl(15, bytes.fromhex(sys.argv[1]))  # PR_SET_NAME: the comm
print("ready", flush=True)
time.sleep(3600)
"""


def test_live_comms_that_are_not_utf8_or_empty_stay_distinct_visible_groups(
    exporter: Any,
) -> None:
    """Processes that set their own comm (prctl) to bytes that are not UTF-8, or to nothing."""
    token = "k" + secrets.token_hex(4)
    started = []
    for comm in (b"x\xff", b"x\xfe", b""):
        p = subprocess.Popen(
            [sys.executable, "-c", RENAME, comm.hex(), token], stdout=subprocess.PIPE, text=True
        )
        started.append(p)
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
    try:
        rule = f"{{name: '{{{{.Comm}}}}', cmdline: ['{token}']}}"
        ours = exporter(f"interval: 0\ngroups:\n  process_names: [{rule}]\n")
        groups = {
            dict(labels)["group"]: n
            for (name, labels), n in ours.metrics().items()
            if name == "kvm_namegroup_processes"
        }
        assert groups == {"x\\xff": 1, "x\\xfe": 1, "<empty>": 1}
    finally:
        for p in started:
            p.kill()
            p.wait()


def test_details_without_rules_say_that_nothing_is_read(caplog: pytest.LogCaptureFixture) -> None:
    """groups.details reads only what a rule named: without rules it reads nothing, and says so
    (FreeBSD refuses the key outright; Linux would else be silent)."""
    with caplog.at_level(logging.WARNING):
        parse_config("groups: {details: [io]}", "cfg.yml")
        parse_config("groups: {details: [io], process_names: [{comm: [sshd]}]}", "cfg.yml")
    assert [r.getMessage() for r in caplog.records] == [
        "cfg.yml: groups.details: no process_names rule names a process: none is read"
    ]
