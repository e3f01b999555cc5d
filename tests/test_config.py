"""The config loader: defaults, the shipped file, durations, flags over the file, errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kvm_exporter import app
from kvm_exporter.config import (
    FLAGS,
    RESERVED_PATHS,
    Config,
    ConfigError,
    Invalid,
    build,
    format_duration,
    load_config,
    parse_config,
    parse_duration,
    with_flags,
)

REPO = Path(__file__).resolve().parent.parent


def test_no_file_means_defaults() -> None:
    assert load_config(None) == Config()
    assert parse_config("") == Config()


def test_shipped_file_documents_exactly_the_defaults() -> None:
    assert load_config(str(REPO / "config" / "kvm_exporter.yml")) == Config()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("15s", 15.0),
        ("500ms", 0.5),
        ("1m", 60.0),
        ("2h", 7200.0),
        ("0", 0.0),
        ("2.5", 2.5),
        ("1h30m", 5400.0),
        ("1m30s", 90.0),
        ("1d", 86400.0),
        ("1w", 604800.0),
        ("1y", 365 * 86400.0),
        ("1d12h", 129600.0),
        ("2m500ms", 120.5),
        ("1h0m0s", 3600.0),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    """Prometheus' duration syntax in the file and in --poll.interval alike."""
    assert parse_config(f"interval: {text}\n").interval == seconds
    assert with_flags(Config(), {"poll.interval": text}).interval == seconds


@pytest.mark.parametrize("text", ["1h1h", "30m1h", "1ms1s", "h", "1x", "1 h", "1y1d", "-1s", ""])
def test_bad_durations(text: str) -> None:
    """Units largest first, each once, at most a year (1y1d is past it)."""
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("seconds", [0, 0.5, 15, 90, 5400, 86400, 129600.5, 365 * 86400])
def test_format_duration_reads_back(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


def test_full_config() -> None:
    config = parse_config(
        "source: procfs\nlabels: [state, user]\nmax_series: 50\n"
        "web: {listen_address: '127.0.0.1:9999', telemetry_path: /m}\n"
        "log: {level: debug}\nprocfs: {root: /host/proc}\n"
        "libkvm: {predicate: uid, argument: 1001, threads: true}\n"
    )
    assert config.labels == ("state", "user")
    assert (config.web.listen_address, config.web.telemetry_path) == (("127.0.0.1:9999",), "/m")
    assert (config.libkvm.predicate, config.libkvm.argument, config.libkvm.threads) == (
        "uid",
        1001,
        True,
    )


def test_flags_win_over_the_file() -> None:
    config = parse_config("web: {listen_address: ':1'}\nlog: {level: debug}\n")
    merged = with_flags(
        config,
        {
            "web.listen-address": [":2", "[::1]:3"],
            "log.level": None,
            "log.format": "json",
            "path.procfs": "/host/proc",
            "poll.interval": "1m30s",
            "collector.labels": ["state"],
        },
    )
    assert merged.web.listen_address == (":2", "[::1]:3")
    assert merged.log == type(merged.log)(level="debug", format="json")  # None: not given
    assert (merged.procfs.root, merged.interval, merged.labels) == ("/host/proc", 90.0, ("state",))


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("web.telemetry-path", "metrics", "--web.telemetry-path: got 'metrics', expected a path"),
        ("web.telemetry-path", "/", "--web.telemetry-path: got '/', expected a path other than"),
        ("web.listen-address", ["bogus"], "--web.listen-address: got 'bogus', expected host:port"),
        ("web.listen-address", [":1", ":99999"], "--web.listen-address: got ':99999', expected"),
        ("web.listen-address", [":1", ":1"], "--web.listen-address: got [':1', ':1'], expected"),
        ("poll.interval", "1x", "--poll.interval: got '1x', expected a duration"),
        ("collector.labels", ["pid"], "--collector.labels: got ['pid'], expected a list drawn"),
        ("log.format", "xml", "--log.format: got 'xml', expected one of logfmt, json"),
    ],
)
def test_flag_errors_name_the_flag(flag: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        with_flags(Config(), {flag: value})
    assert str(err.value).startswith(message)


def test_every_flag_overrides_a_real_key() -> None:
    for flag, dotted in FLAGS.items():
        section, _, key = dotted.rpartition(".")
        assert hasattr(getattr(Config(), section) if section else Config(), key), flag


def test_reserved_paths_are_the_apps_own() -> None:
    assert {"/", app.HEALTH_PATH, app.READY_PATH} == set(RESERVED_PATHS)


def test_listen_addresses_one_or_a_list() -> None:
    assert parse_config("web: {listen_address: '[::1]:1'}").web.listen_address == ("[::1]:1",)
    addresses = parse_config("web: {listen_address: [':1', 'localhost:2']}").web.listen_address
    assert addresses == (":1", "localhost:2")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "intervall: 5s",
            "cfg.yml: intervall: unknown key (expected one of compat, groups, interval, labels",
        ),
        ("web: {port: 1}", "cfg.yml: web.port: unknown key (expected one of config_file"),
        ("interval: five", "cfg.yml: interval: got 'five', expected a duration"),
        ("interval: -1", "cfg.yml: interval: got -1, expected a duration of 0 or more"),
        ("labels: [user, pid]", "cfg.yml: labels: got ['user', 'pid'], expected a list drawn"),
        ("labels: user", "cfg.yml: labels: got 'user', expected a list drawn"),
        ("max_series: 3", "cfg.yml: max_series: got 3, expected an integer of 14 or more"),
        ("max_series: '100'", "cfg.yml: max_series: got '100', expected an integer"),
        ("source: bsd", "cfg.yml: source: got 'bsd', expected one of auto, procfs, libkvm"),
        ("log: {level: loud}", "cfg.yml: log.level: got 'loud', expected one of debug"),
        ("web: {telemetry_path: metrics}", "expected a path starting with /"),
        ("web: {telemetry_path: /-/ready}", "web.telemetry_path: got '/-/ready', expected a path"),
        ("web: {telemetry_path: /-/healthy}", "web.telemetry_path: got '/-/healthy', expected"),
        ("web: {telemetry_path: '/m?x'}", "web.telemetry_path: got '/m?x', expected a path"),
        ("web: {listen_address: bogus}", "web.listen_address: got 'bogus', expected host:port"),
        ("web: {listen_address: ':99999'}", "web.listen_address: got ':99999', expected host"),
        ("web: {listen_address: []}", "web.listen_address: got [], expected host:port or a"),
        ("web: {listen_address: [':1', 2]}", "web.listen_address: got 2, expected a host:port"),
        ("log: {format: xml}", "cfg.yml: log.format: got 'xml', expected one of logfmt, json"),
        ("interval: 1h1h", "cfg.yml: interval: got '1h1h', expected a duration such as 15s, 1m30s"),
        ("web: []", "cfg.yml: web: expected a mapping"),
        ("[1, 2]", "cfg.yml: top level: expected a mapping"),
        ("libkvm: {threads: 'yes'}", "cfg.yml: libkvm.threads: got 'yes', expected true or false"),
        ("libkvm: {argument: 1.5}", "cfg.yml: libkvm.argument: got 1.5, expected an integer"),
        ("interval: -0x" + "f" * 5000, "cfg.yml: interval: got an integer too long to show"),
        ("interval: [", "cfg.yml: line 1, column 12: invalid YAML"),
        (
            "groups: {details: [io, wchan]}",
            "cfg.yml: groups.details: got ['io', 'wchan'], expected a list drawn from io, fd,"
            " status, smaps without repeats",
        ),
        ("groups: {details: io}", "cfg.yml: groups.details: got 'io', expected a list drawn"),
        ("a: b\n  c: d", "cfg.yml: line 2, column 4: invalid YAML"),
    ],
)
def test_bad_configs_name_file_key_and_expectation(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "cfg.yml")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_an_empty_section_takes_its_defaults() -> None:
    assert parse_config("web:\nlog:\nprocfs:\nlibkvm:\n") == Config()


@dataclass(frozen=True)
class Point:
    x: int
    y: int = field(default=0, metadata={"key": "y-coordinate"})
    tags: tuple[str, ...] = ()


def test_build_required_keys_yaml_names_and_entry_errors() -> None:
    def tags(value: Any) -> tuple[str, ...]:
        for tag in value:
            if not tag.isalpha():
                raise Invalid("expected letters only", at=tag)
        return tuple(value)

    def point(data: Any) -> Point:
        return build(Point, data, "p.yml", {"tags": tags}, {})

    assert point({"x": 1, "y-coordinate": 2, "tags": ["a"]}) == Point(1, 2, ("a",))
    for data, message in [
        ({}, "p.yml: x: missing, expected an integer"),
        ({"x": 1, "y": 2}, "p.yml: y: unknown key (expected one of tags, x, y-coordinate)"),
        ({"x": 1, "tags": ["a", "b2"]}, "p.yml: tags.b2: expected letters only"),
    ]:
        with pytest.raises(ConfigError) as err:
            point(data)
        assert str(err.value) == message


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yml: cannot read config file: No such file"):
        load_config(str(tmp_path / "nope.yml"))
    with pytest.raises(ConfigError, match="cannot read config file: Is a directory"):
        load_config(str(tmp_path))
    binary = tmp_path / "binary.yml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="binary.yml: cannot read config file"):
        load_config(str(binary))
