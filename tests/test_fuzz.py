"""Property tests over what a local user or an operator controls: /proc/PID/stat and config.

``/proc/PID/stat`` holds the process's comm, which any process sets to any 15 bytes
(``prctl(PR_SET_NAME)``; kernel worker threads show up to 64), so the parser must give back
exactly the comm and the fields after it whatever bytes the comm holds. Garbage that no
kernel writes may raise ``ValueError`` or ``IndexError`` (never anything else); the source
turns that into a :class:`SourceError` naming the file.

A config file is YAML any operator may get wrong: :func:`parse_config` either returns a
:class:`Config` or raises :class:`ConfigError` naming the file and the key, never another
exception, and every valid config parses to the values it states.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kvm_exporter.aggregate import MIN_SERIES
from kvm_exporter.config import (
    LABELS,
    LOG_LEVELS,
    PREDICATES,
    RESERVED_PATHS,
    SOURCES,
    Config,
    ConfigError,
    parse_config,
    parse_duration,
    shown,
)
from kvm_exporter.records import SourceError
from kvm_exporter.sources.procfs import ProcfsSource, parse_stat
from kvm_exporter.states import LINUX_STATES

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
WHERE = "/etc/kvm_exporter/fuzz.yml"

# ---------------------------------------------------------------- /proc/PID/stat

# Every byte a comm can hold: anything but NUL (the kernel stops the name there).
COMM_BYTES = st.binary(max_size=64).map(lambda b: b.replace(b"\0", b""))
HOSTILE_COMMS = [
    b"",
    b")",
    b"(",
    b"()",
    b") R 1 2 3",
    b"x) Z 1 1 1 1 1 (",
    b"a b\nc\td",
    b"\"\\'",
    b"\xff\xfe\x80",
    b"\xc3(",
    b") ) )",
    b"kworker/u8:0-events_unbound",
]


def stat_line(pid: int, comm: bytes, state: str, numbers: list[int]) -> bytes:
    """A ``/proc/PID/stat`` line as the kernel writes it (``do_task_stat``)."""
    rest = " ".join(str(n) for n in numbers).encode()
    return b"%d (%s) %s %s\n" % (pid, comm, state.encode(), rest)


NUMBERS = st.lists(st.integers(min_value=-(2**63), max_value=2**64 - 1), min_size=49, max_size=49)


@FUZZ
@given(
    pid=st.integers(min_value=1, max_value=4194304),
    comm=COMM_BYTES,
    state=st.sampled_from(sorted(LINUX_STATES)),
    numbers=NUMBERS,
)
@example(pid=1, comm=b") R 1 2 3", state="S", numbers=[0] * 49)
@example(pid=1, comm=b"\n)\n(", state="Z", numbers=[0] * 49)
def test_parse_stat_gives_back_any_comm(
    pid: int, comm: bytes, state: str, numbers: list[int]
) -> None:
    name, fields = parse_stat(stat_line(pid, comm, state, numbers))
    assert name == comm.decode("utf-8", "replace")
    assert fields == [state.encode(), *(str(n).encode() for n in numbers)]


@pytest.mark.parametrize("comm", HOSTILE_COMMS, ids=repr)
def test_parse_stat_hostile_comms(comm: bytes) -> None:
    numbers = list(range(2, 51))
    name, fields = parse_stat(stat_line(4242, comm, "S", numbers))
    assert name == comm.decode("utf-8", "replace")
    assert fields[0] == b"S" and [int(f) for f in fields[1:]] == numbers


@FUZZ
@given(data=st.binary(max_size=600))
@example(data=b"")
@example(data=b")(")
@example(data=b"1 (x")
@example(data=b"1 x)")
@example(data=b"1 (x)")
def test_parse_stat_garbage_raises_only_value_or_index_error(data: bytes) -> None:
    """Documented contract: ``ValueError`` when there is no ``(`` or no ``)``; otherwise a
    (comm, fields) pair that the caller checks (a short list gives ``IndexError``)."""
    try:
        name, fields = parse_stat(data)
    except ValueError:
        assert b"(" not in data or b")" not in data
        return
    assert isinstance(name, str)
    assert all(isinstance(f, bytes) and f for f in fields)


def fake_procfs(root: Path, stats: dict[int, bytes], uid: int = 1234) -> None:
    """A minimal procfs tree: enough for :class:`ProcfsSource` to read every part."""
    (root / "sys" / "kernel").mkdir(parents=True)
    (root / "loadavg").write_text("0.50 0.25 0.10 1/100 4242\n")
    (root / "stat").write_text("cpu  1 2 3 4\ncpu0 1 2 3 4\nbtime 1700000000\n")
    (root / "swaps").write_text("Filename\tType\tSize\tUsed\tPriority\n")
    (root / "sys" / "kernel" / "pid_max").write_text("4194304\n")
    (root / "sys" / "kernel" / "threads-max").write_text("63000\n")
    for pid, stat in stats.items():
        (root / str(pid)).mkdir()
        os.chown(root / str(pid), uid, uid)
        (root / str(pid) / "stat").write_bytes(stat)
        (root / str(pid) / "status").write_text(
            f"Name:\tx\nState:\tS (sleeping)\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"
        )


@FUZZ
@given(comms=st.lists(COMM_BYTES, min_size=1, max_size=5), state=st.sampled_from("RSDZTtI"))
def test_procfs_source_reads_any_comm(
    tmp_path_factory: Any, comms: list[bytes], state: str
) -> None:
    root = tmp_path_factory.mktemp("proc")
    numbers = [7, 7, 7, 34816] + [0] * 45  # ppid 7, tty pts/0
    numbers[17 - 1] = 3  # num_threads is field 20: index 17 after the state
    stats = {100 + i: stat_line(100 + i, c, state, numbers) for i, c in enumerate(comms)}
    fake_procfs(root, stats)
    procs = sorted(ProcfsSource(str(root)).procs())
    assert [p.comm for p in procs] == [c.decode("utf-8", "replace") for c in comms]
    for p in procs:
        assert (p.ppid, p.uid, p.tty, p.threads) == (7, 1234, "pts/0", 3)
        assert p.state == LINUX_STATES[state]


@FUZZ
@given(data=st.binary(max_size=300))
@example(data=b"1 (x) S\n")
@example(data=b"1 (x) S a b c d e f g h i j k l m n o p q r s t u v w\n")
@example(data=b"")
def test_procfs_source_garbage_stat_is_a_source_error(tmp_path_factory: Any, data: bytes) -> None:
    """A stat file no kernel writes gives a Proc, is skipped (empty: a pid being reaped), or
    raises SourceError naming the procfs root; never another exception."""
    root = tmp_path_factory.mktemp("proc")
    fake_procfs(root, {4242: data})
    source = ProcfsSource(str(root))
    try:
        procs = source.procs()
    except SourceError as err:
        assert str(root) in str(err) and "\n" not in str(err)
        return
    assert len(procs) <= 1


@FUZZ
@given(lines=st.lists(st.binary(max_size=80), max_size=4))
@example(lines=[b"/swap\\040x\tfile\t4\t1\t-2"])
@example(lines=[b"/swap\\777\tfile\t4\t1\t-2"])
@example(lines=[b"/swap\tfile\tfour\t1\t-2"])
@example(lines=[b"/swap"])
def test_procfs_source_garbage_swaps_is_a_source_error(
    tmp_path_factory: Any, lines: list[bytes]
) -> None:
    root = tmp_path_factory.mktemp("proc")
    fake_procfs(root, {})
    (root / "swaps").write_bytes(b"Filename\tType\tSize\tUsed\tPriority\n" + b"\n".join(lines))
    try:
        devices = ProcfsSource(str(root)).swap()
    except SourceError as err:
        assert f"{root}/swaps" in str(err)
        return
    for device in devices:
        device.device.encode("utf-8")  # a label value: valid UTF-8, no lone surrogates


# ---------------------------------------------------------------- config files

KEYS = [
    "source",
    "interval",
    "labels",
    "max_series",
    "web",
    "log",
    "procfs",
    "libkvm",
    "listen_address",
    "telemetry_path",
    "config_file",
    "level",
    "root",
    "library",
    "predicate",
    "argument",
    "threads",
    "kernel",
    "core",
    "swapfile",
]
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**400)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from([*SOURCES, *LOG_LEVELS, *PREDICATES, *LABELS, "15s", "500ms", "/x", "1m"])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
DOCS = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), VALUES, max_size=6)


def parses_or_config_error(text: str) -> Config | None:
    try:
        config = parse_config(text, WHERE)
    except ConfigError as err:
        message = str(err)
        assert message.startswith(WHERE + ": "), message
        assert "Traceback" not in message
        return None
    assert isinstance(config, Config)
    return config


def check_sane(config: Config) -> None:
    """What the rest of the exporter relies on, whatever the file said."""
    assert math.isfinite(config.interval) and 0 <= config.interval <= 10**9
    assert isinstance(config.max_series, int) and config.max_series >= MIN_SERIES
    assert set(config.labels) <= set(LABELS)
    assert config.source in SOURCES and config.log.level in LOG_LEVELS
    assert config.web.telemetry_path.startswith("/")


@FUZZ
@given(doc=DOCS | VALUES)
def test_any_yaml_document_is_a_config_or_a_config_error(doc: Any) -> None:
    text = yaml.safe_dump(doc, allow_unicode=True)
    config = parses_or_config_error(text)
    if config is not None:
        check_sane(config)


YAMLISH = st.lists(
    st.sampled_from(list("abc:- \n\t[]{}'\",#&*!|>%@`?.0129eE+\\") + KEYS[:8]), max_size=60
).map("".join)


@FUZZ
@given(text=YAMLISH | st.text(max_size=200))
@example(text="[" * 5000 + "]" * 5000)
@example(text="a: " + "{" * 3000)
@example(text="max_series: 1" + "0" * 5000)
@example(text="interval: 1" + "0" * 400)
@example(text="interval: " + "9" * 400 + "s")
@example(text="interval: .inf")
@example(text="interval: .nan")
@example(text="interval: -.inf")
@example(text="interval: 1.0e+20")
@example(text="\0")
@example(text="\ufeffsource: procfs")
@example(text="&a [*a]")
@example(text="a: &a [x, x]\nb: &b [*a, *a, *a]\nc: [*b, *b, *b, *b]")
@example(text="? " + "k" * 300 + "\n: 1")
@example(text="? [a, b]\n: 1")
@example(text="!!python/object:os.system {}")
def test_any_text_is_a_config_or_a_config_error(text: str) -> None:
    config = parses_or_config_error(text)
    if config is not None:
        check_sane(config)


@FUZZ
@given(value=VALUES)
def test_shown_is_short_for_any_value(value: Any) -> None:
    assert len(shown(value)) <= 120


def test_shown_is_short_for_huge_shared_and_deep_values() -> None:
    bomb: list[Any] = ["x"] * 9
    for _ in range(8):
        bomb = [bomb] * 9  # 9**9 leaves, as a YAML alias bomb constructs it
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    huge = ("x" * 10**7, 10**4000, 16**5000, {str(i): [i] for i in range(10**5)}, bomb, deep)
    for value in huge:
        assert len(shown(value)) <= 120
    assert shown("linux") == "'linux'" and shown([1, "a"]) == "[1, 'a']"


def section(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A mapping holding any subset of ``fields``."""
    return st.fixed_dictionaries({}, optional=fields)


PATHS = st.from_regex(r"\A/[a-z0-9_./-]{0,30}\Z")
DURATIONS = st.one_of(
    st.integers(min_value=0, max_value=86400),
    st.floats(min_value=0, max_value=86400, allow_nan=False),
    st.builds(
        lambda n, unit: f"{n}{unit}",
        st.integers(min_value=0, max_value=8760),  # 8760h is the one-year ceiling
        st.sampled_from(["", "ms", "s", "m", "h"]),
    ),
)
VALID = section(
    source=st.sampled_from(SOURCES),
    interval=DURATIONS,
    labels=st.lists(st.sampled_from(LABELS), unique=True),
    max_series=st.integers(min_value=MIN_SERIES, max_value=10**9),
    web=section(
        listen_address=st.sampled_from([":9429", "127.0.0.1:0", "[::1]:9429", "localhost:1"]),
        telemetry_path=PATHS.filter(lambda path: path not in RESERVED_PATHS),
        config_file=st.none() | PATHS,
    ),
    log=section(level=st.sampled_from(LOG_LEVELS)),
    procfs=section(root=PATHS),
    libkvm=section(
        # No control or line-separator characters: PyYAML's own dump/load round trip turns
        # some of them (NEL, U+0085) into spaces.
        library=st.text(
            st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=30
        ),
        predicate=st.sampled_from(PREDICATES),
        argument=st.none() | st.integers(min_value=-(2**31), max_value=2**31 - 1),
        threads=st.booleans(),
        kernel=st.none() | PATHS,
        core=st.none() | PATHS,
        swapfile=st.none() | PATHS,
    ),
)


@FUZZ
@given(doc=VALID)
def test_every_valid_config_parses_to_what_it_says(doc: dict[str, Any]) -> None:
    config = parse_config(yaml.safe_dump(doc, allow_unicode=True), WHERE)
    check_sane(config)
    for key, value in doc.items():
        got = getattr(config, key)
        if key == "interval":
            assert got == pytest.approx(parse_duration(value))
        elif key == "labels":
            assert got == tuple(value)
        elif isinstance(value, dict):
            for sub, subvalue in value.items():
                if sub == "listen_address":  # one string or a list, kept as a tuple
                    subvalue = (subvalue,)
                assert getattr(got, sub) == subvalue, (key, sub)
        else:
            assert got == value, key


# One wrong value per key: each must be a ConfigError naming the file and the dotted key.
WRONG = [
    ("source: linux", "source"),
    ("source: 1", "source"),
    ("interval: -1", "interval"),
    ("interval: 15 seconds", "interval"),
    ("interval: true", "interval"),
    ("interval: .inf", "interval"),
    ("interval: .nan", "interval"),
    ("interval: 1" + "0" * 400, "interval"),
    ("interval: " + "9" * 400 + "s", "interval"),
    ("interval: 1.0e+20", "interval"),
    ("labels: user", "labels"),
    ("labels: [user, user]", "labels"),
    ("labels: [pid]", "labels"),
    ("max_series: 5", "max_series"),
    ("max_series: 1.5e3", "max_series"),
    ("max_series: '100'", "max_series"),
    ("max_series: true", "max_series"),
    ("web: []", "web"),
    ("web: {listen_address: 9429}", "web.listen_address"),
    ("web: {telemetry_path: metrics}", "web.telemetry_path"),
    ("web: {port: 1}", "web.port"),
    ("log: {level: verbose}", "log.level"),
    ("log: warn", "log"),
    ("procfs: {root: [1]}", "procfs.root"),
    ("libkvm: {predicate: everything}", "libkvm.predicate"),
    ("libkvm: {argument: one}", "libkvm.argument"),
    ("libkvm: {threads: 'yes'}", "libkvm.threads"),
    ("libkvm: {core: {a: 1}}", "libkvm.core"),
    ("colour: blue", "colour"),
]


@pytest.mark.parametrize(("text", "key"), WRONG, ids=[w[1] + ":" + w[0][:30] for w in WRONG])
def test_each_wrong_value_names_file_and_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, WHERE)
    message = str(caught.value)
    assert message.startswith(f"{WHERE}: {key}: "), message
    assert "\n" not in message, message


@pytest.mark.parametrize(
    "text",
    [
        "[" * 5000 + "]" * 5000,
        "a: " + "{" * 3000,
        "max_series: 1" + "0" * 5000,
        "{a: [1, 2",
        "a: b: c",
        "\t- x",
        "&a [*b]",
    ],
    ids=["deep-list", "deep-flow", "huge-int", "unclosed", "nested-colon", "tab", "bad-alias"],
)
def test_invalid_yaml_is_one_clear_line(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, WHERE)
    message = str(caught.value)
    assert message.startswith(WHERE + ": ") and "YAML" in message, message
    assert "\n" not in message, message


@given(seconds=st.floats(min_value=0, max_value=10**6, allow_nan=False))
@settings(deadline=None, database=None)
def test_duration_round_trip(seconds: float) -> None:
    assert parse_duration(seconds) == seconds
    assert parse_duration(f"{seconds:.6f}s") == pytest.approx(seconds, abs=1e-6)
    assert parse_duration(f"{seconds:.3f}ms") == pytest.approx(seconds / 1000, abs=1e-6)
