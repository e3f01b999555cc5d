"""The config loader: defaults, the shipped file, durations, flags over the file, errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kvm_exporter.config import (
    Config,
    ConfigError,
    Invalid,
    build,
    load_config,
    parse_config,
    with_overrides,
)

REPO = Path(__file__).resolve().parent.parent


def test_no_file_means_defaults() -> None:
    assert load_config(None) == Config()
    assert parse_config("") == Config()


def test_shipped_file_documents_exactly_the_defaults() -> None:
    assert load_config(str(REPO / "config" / "kvm_exporter.yml")) == Config()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("15s", 15.0), ("500ms", 0.5), ("1m", 60.0), ("2h", 7200.0), ("0", 0.0), ("2.5", 2.5)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_config(f"interval: {text}\n").interval == seconds


def test_full_config() -> None:
    config = parse_config(
        "source: procfs\nlabels: [state, user]\nmax_series: 50\n"
        "web: {listen_address: '127.0.0.1:9999', telemetry_path: /m}\n"
        "log: {level: debug}\nprocfs: {root: /host/proc}\n"
        "libkvm: {predicate: uid, argument: 1001, threads: true}\n"
    )
    assert config.labels == ("state", "user")
    assert (config.web.listen_address, config.web.telemetry_path) == ("127.0.0.1:9999", "/m")
    assert (config.libkvm.predicate, config.libkvm.argument, config.libkvm.threads) == (
        "uid",
        1001,
        True,
    )


def test_flags_win_over_the_file() -> None:
    config = parse_config("web: {listen_address: ':1'}\nlog: {level: debug}\n")
    merged = with_overrides(
        config, {"web.listen_address": ":2", "log.level": None, "source": "libkvm"}
    )
    assert merged.web.listen_address == ":2"
    assert merged.log.level == "debug"  # None: the flag was not given
    assert merged.source == "libkvm"


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
        ("web: []", "cfg.yml: web: expected a mapping"),
        ("[1, 2]", "cfg.yml: top level: expected a mapping"),
        ("libkvm: {threads: 'yes'}", "cfg.yml: libkvm.threads: got 'yes', expected true or false"),
        ("libkvm: {argument: 1.5}", "cfg.yml: libkvm.argument: got 1.5, expected an integer"),
        ("interval: -0x" + "f" * 5000, "cfg.yml: interval: got an integer too long to show"),
        ("interval: [", "cfg.yml: line 1, column 12: invalid YAML"),
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
