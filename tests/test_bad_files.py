"""Hostile config and web config files: a FIFO, /dev/zero, a directory, a file over the size cap,
a list of millions of values, a YAML alias bomb, a huge scalar. Each is one short error line,
never a block or a memory blow-up; a running exporter keeps its configuration and serves on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tlsutil
from attack_support import rss_mib
from conftest import free_port, wait_until

from kvm_exporter.config import ConfigError, parse_config, parse_yaml
from kvm_exporter.files import MAX_FILE_BYTES, MAX_YAML_NODES, Unreadable, read_file


def alias_bomb(levels: int = 9) -> str:
    """The billion laughs in YAML: each level is nine uses of the one before."""
    lines = ["a0: &a0 [x,x,x,x,x,x,x,x,x]"]
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def fifo(path: Path) -> None:
    os.mkfifo(path)


def sparse(path: Path) -> None:
    with path.open("wb") as f:
        f.truncate(100 << 20)


# name -> (make the bad file at a path, what its one error line says)
BAD: dict[str, tuple[Callable[[Path], None], str]] = {
    "dev-zero": (
        lambda p: p.symlink_to("/dev/zero"),
        "Is a character device, expected a regular file",
    ),
    "fifo": (fifo, "Is a FIFO, expected a regular file"),
    "directory": (lambda p: p.mkdir(), "Is a directory, expected a regular file"),
    "over-size-cap": (
        lambda p: p.write_bytes(b"- 1\n" * (MAX_FILE_BYTES // 4 + 1)),
        f"Too large, expected at most {MAX_FILE_BYTES} bytes (4 MiB)",
    ),
    "sparse-100MB": (sparse, "Too large, expected at most"),
    "two-million-item-list": (
        lambda p: p.write_bytes(b"[" + b"1," * 2_000_000 + b"1]"),
        f"more than {MAX_YAML_NODES} values",
    ),
    "alias-bomb": (lambda p: p.write_text(alias_bomb()), f"more than {MAX_YAML_NODES} values"),
    "huge-scalar": (
        lambda p: p.write_text("source: " + "x" * 3_000_000 + "\n"),
        "a value of 3000000 characters, expected at most 8192",
    ),
}


def value(metrics: dict[Any, float], name: str) -> float:
    return metrics[(name, frozenset())]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "level=error" in line]


def test_alias_bomb_is_refused_with_its_position() -> None:
    bomb = alias_bomb()
    assert len(bomb) < 500
    with pytest.raises(ConfigError) as caught:
        parse_config(bomb, "bomb.yml")
    assert str(caught.value).startswith(f"bomb.yml: line 5, column 10: more than {MAX_YAML_NODES}")


def test_aliases_within_the_budget_still_work() -> None:
    assert parse_yaml("a: &x [1, {b: 2}]\nc: *x\nd: [*x, *x]\n", "a.yml") == {
        "a": [1, {"b": 2}],
        "c": [1, {"b": 2}],
        "d": [[1, {"b": 2}], [1, {"b": 2}]],
    }
    with pytest.raises(ConfigError, match="^a.yml: line 1, column 13: alias 'a' refers to itself"):
        parse_yaml("labels: &a [*a]\n", "a.yml")


@pytest.mark.parametrize("name", sorted(BAD))
def test_read_file_refuses_without_blocking(tmp_path: Path, name: str) -> None:
    make, says = BAD[name]
    path = tmp_path / "bad.yml"
    make(path)
    if name in ("two-million-item-list", "alias-bomb", "huge-scalar"):
        assert len(read_file(str(path))) <= MAX_FILE_BYTES  # refused by the YAML loader
        return
    with pytest.raises(Unreadable, match=says.split(",")[0]):
        read_file(str(path))


def test_a_file_growing_past_the_cap_after_fstat_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "small.yml"
    path.write_text("a: 1\n")
    with pytest.raises(Unreadable, match="Too large, expected at most 4 bytes"):
        read_file(str(path), limit=4)
    assert read_file(str(path), limit=5) == b"a: 1\n"


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_file_on_reload_keeps_the_running_config(
    exporter: Any, tmp_path: Path, name: str
) -> None:
    make, says = BAD[name]
    e = exporter("interval: 1h\nlabels: [user, state]\n")
    e.config_path.unlink()
    make(e.config_path)
    e.proc.send_signal(signal.SIGHUP)
    errors = wait_until(lambda: error_lines(e.stderr()), what="the failed reload's log line")
    assert len(errors) == 1 and says in errors[0], errors
    assert len(errors[0]) < 400, errors[0][:400]
    metrics = e.metrics()
    assert value(metrics, "kvm_config_reload_failures_total") == 1
    assert (value(metrics, "kvm_config_last_reload_successful"), value(metrics, "kvm_up")) == (0, 1)
    assert any(n == "kvm_processes" and "user" in dict(lb) for (n, lb) in metrics)
    assert "Traceback" not in e.stderr()
    assert rss_mib(e.proc.pid) < 100
    start = time.monotonic()
    e.proc.send_signal(signal.SIGTERM)
    assert e.proc.wait(timeout=5) == 0
    assert time.monotonic() - start < 2.0


def run(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "kvm_exporter", f"--web.listen-address=127.0.0.1:{free_port()}"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=30, cwd="/")


def assert_one_line(result: subprocess.CompletedProcess[str], says: str) -> None:
    assert result.returncode == 1, result.stderr[-2000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and says in errors[0], result.stderr[-2000:]
    assert len(errors[0]) < 400 and "Traceback" not in result.stderr


@pytest.mark.parametrize("check", [False, True], ids=["start", "config.check"])
@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_config_file_at_start_up(tmp_path: Path, name: str, check: bool) -> None:
    make, says = BAD[name]
    path = tmp_path / "kvm_exporter.yml"
    make(path)
    result = run(f"--config.file={path}", *(["--config.check"] if check else []))
    assert_one_line(result, f"{path}: ")
    assert says in result.stderr


WEB_FILES = ["web config", "cert_file", "key_file", "client_ca_file"]
WEB_BAD = ["fifo", "dev-zero", "directory", "over-size-cap"]


@pytest.mark.parametrize("check", [False, True], ids=["start", "config.check"])
@pytest.mark.parametrize("name", WEB_BAD)
@pytest.mark.parametrize("which", WEB_FILES)
def test_bad_web_file_at_start_up(tmp_path: Path, which: str, name: str, check: bool) -> None:
    tlsutil.write_pki(tmp_path)
    files = {"cert_file": "server.pem", "key_file": "server-key.pem", "client_ca_file": "ca.pem"}
    web = tmp_path / "web.yml"
    web.write_text(
        "tls_server_config:\n"
        + "".join(f"  {key}: {file}\n" for key, file in files.items())
        + "  client_auth_type: RequireAndVerifyClientCert\n"
    )
    bad = web if which == "web config" else tmp_path / files[which]
    bad.unlink()
    BAD[name][0](bad)
    result = run(f"--web.config.file={web}", *(["--config.check"] if check else []))
    key = "" if which == "web config" else f"web.yml: tls_server_config.{which}: "
    assert_one_line(result, key + f"cannot read {'web config file: ' if not key else bad}")
    assert BAD[name][1] in result.stderr
