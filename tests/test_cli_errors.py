"""Bad configurations on the command line: ``--config.check`` and a plain start both exit
non-zero with exactly one clear line on stderr that names the file (or flag) and the key,
and never a traceback.

Every case runs three real processes at once: ``--config.check`` as root, a plain start as
root (which may add its one "running as root" warning first) and a plain start as nobody
(exactly one line)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from attack_support import NOBODY, import_path, world_dir
from conftest import SYSTEM_PYTHON, free_port
from tlsutil import write_pki


@dataclass(frozen=True)
class Case:
    id: str
    content: str | bytes | None
    """The config file's content; None: no file at all (the path does not exist)."""
    says: tuple[str, ...]
    """What the one line must hold besides the file's path ("{path}" is replaced)."""
    flags: tuple[str, ...] = ()
    listen: bool = True
    """False: the start gets no --web.listen-address (the file's own address is wrong)."""
    mode: int = 0o644
    as_root: bool = True
    """False: root could read the file anyway (mode 000)."""


CASES = [
    # unknown keys
    Case("unknown-key", "colour: blue\n", ("{path}: colour: unknown key",)),
    Case("unknown-nested-key", "web:\n  port: 9429\n", ("{path}: web.port: unknown key",)),
    Case("typo-key", "max_serie: 100\n", ("{path}: max_serie: unknown key", "max_series")),
    # wrong types
    Case("type-max-series", "max_series: '100'\n", ("{path}: max_series: ", "an integer")),
    Case("type-interval", "interval: [15]\n", ("{path}: interval: ", "duration")),
    Case("type-labels", "labels: user\n", ("{path}: labels: ", "a list")),
    Case("type-section", "web: 9429\n", ("{path}: web: expected a mapping",)),
    Case("type-root", "procfs:\n  root: 5\n", ("{path}: procfs.root: ", "a string")),
    Case("type-bool", "libkvm:\n  threads: 'yes'\n", ("{path}: libkvm.threads: ", "true or false")),
    Case("type-top", "- source\n- procfs\n", ("{path}: top level: expected a mapping",)),
    # wrong values
    Case("value-source", "source: linux\n", ("{path}: source: ", "one of auto, procfs")),
    Case("value-cap", "max_series: 5\n", ("{path}: max_series: ", "or more")),
    Case("value-level", "log:\n  level: verbose\n", ("{path}: log.level: ", "one of debug")),
    Case("value-path", "web:\n  telemetry_path: metrics\n", ("{path}: web.telemetry_path: ",)),
    Case("value-interval", "interval: -1s\n", ("{path}: interval: ",)),
    Case("value-interval-inf", "interval: .inf\n", ("{path}: interval: ", "at most")),
    Case("value-predicate", "libkvm:\n  predicate: every\n", ("{path}: libkvm.predicate: ",)),
    Case("value-labels", "labels: [user, pid]\n", ("{path}: labels: ", "drawn from")),
    # a huge message (a flag's path, twice in dlopen's error) is cut in the line, which says so
    Case(
        "long-message",
        "",
        ("cannot load libkvm from '/xxxx", "xxx[", " characters cut]"),
        ("--libkvm.library=/" + "x" * 5000, "--libkvm.core=/nonexistent"),
    ),
    # the file itself
    Case("invalid-yaml", "interval: [15s\n", ("{path}: line ", "invalid YAML")),
    Case("invalid-yaml-tab", "web:\n\t- x\n", ("{path}: line ", "invalid YAML")),
    Case("deep-yaml", "a: " + "[" * 3000, ("{path}: ", "invalid YAML")),
    Case("not-utf8", b"source: \xff\xfe\n", ("{path}: cannot read config file", "utf-8")),
    Case("missing-file", None, ("{path}: cannot read config file: No such file",)),
    Case("directory", "", ("{path}: cannot read config file: Is a directory",)),
    Case(
        "unreadable",
        "interval: 15s\n",
        ("{path}: cannot read config file: Permission denied",),
        mode=0o000,
        as_root=False,
    ),
    Case(
        "web-config-missing",
        "web:\n  config_file: /nonexistent/web.yml\n",
        ("/nonexistent/web.yml: cannot read web config file",),
    ),
    Case(
        "regex-go-refuses",
        "groups:\n  process_names: [{cmdline: ['java (?=-jar)']}]\n",
        ("{path}: groups.process_names.0.cmdline.0: bad regex 'java (?=-jar)': invalid perl",),
    ),
    # what only opening the source finds: the check opens it too
    Case(
        "libkvm-missing",
        "source: libkvm\nlibkvm:\n  library: /nonexistent/libkvm.so.7\n",
        ("/nonexistent/libkvm.so.7",),
    ),
    Case("libkvm-on-linux", "source: libkvm\n", ("cannot load libkvm", "libkvm.so.7")),
    Case("procfs-not-procfs", "procfs:\n  root: /etc\n", ("/etc does not look like procfs",)),
    Case("procfs-missing", "procfs:\n  root: /nonexistent\n", ("/nonexistent does not look",)),
    # what would only fail when listening or serving
    Case(
        "listen-bogus",
        "web:\n  listen_address: bogus\n",
        ("{path}: web.listen_address: got 'bogus', expected host:port",),
        listen=False,
    ),
    Case(
        "listen-port-range",
        "web:\n  listen_address: ':99999'\n",
        ("{path}: web.listen_address: got ':99999', expected host:port",),
        listen=False,
    ),
    Case("path-root", "web:\n  telemetry_path: /\n", ("{path}: web.telemetry_path: got '/'",)),
    Case(
        "path-healthy",
        "web:\n  telemetry_path: /-/healthy\n",
        ("{path}: web.telemetry_path: got '/-/healthy', expected a path other than",),
    ),
    Case(
        "path-ready",
        "web:\n  telemetry_path: /-/ready\n",
        ("{path}: web.telemetry_path: got '/-/ready', expected a path other than",),
    ),
    # flags get the same checks as the file's keys, and errors name the flag
    Case(
        "flag-log-level", "", ("--log.level: got 'bogus'", "one of debug"), ("--log.level=bogus",)
    ),
    Case("flag-log-format", "", ("--log.format: got 'xml'", "logfmt, json"), ("--log.format=xml",)),
    Case(
        "flag-telemetry-path",
        "",
        ("--web.telemetry-path: got 'metrics'", "starting with /"),
        ("--web.telemetry-path=metrics",),
    ),
    Case(
        "flag-telemetry-path-ready",
        "",
        ("--web.telemetry-path: got '/-/ready'", "other than"),
        ("--web.telemetry-path=/-/ready",),
    ),
    Case(
        "flag-listen-bogus",
        "",
        ("--web.listen-address: got 'bogus', expected host:port",),
        ("--web.listen-address=bogus",),
    ),
    Case(
        "flag-listen-port-range",
        "",
        ("--web.listen-address: got ':99999', expected host:port",),
        ("--web.listen-address=:99999",),
    ),
    Case(
        "flag-poll-interval",
        "",
        ("--poll.interval: got '15 seconds', expected a duration",),
        ("--poll.interval=15 seconds",),
    ),
    Case(
        "flag-labels",
        "",
        ("--collector.labels: got ['user', 'pid'], expected a list drawn from",),
        ("--collector.labels=user,pid",),
    ),
    Case(
        "flag-listen-unknown-host",  # .invalid never resolves (RFC 6761)
        "",
        ("cannot listen on nosuchhost.invalid:9429: ",),
        ("--web.listen-address=nosuchhost.invalid:9429",),
    ),
    Case(
        "flag-procfs",
        "",
        ("/nonexistent does not look like procfs",),
        ("--path.procfs=/nonexistent",),
    ),
]


def run(args: list[str], user: int | None) -> subprocess.Popen[str]:
    owner = {"user": user, "group": user, "extra_groups": []} if user is not None else {}
    return subprocess.Popen(
        [SYSTEM_PYTHON, "-m", "kvm_exporter", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": import_path()},
        cwd="/",
        **owner,  # type: ignore[arg-type]
    )


def finish(proc: subprocess.Popen[str], what: str) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"{what}: still running after 60s; stderr: {err}") from None
    return proc.returncode, err


def the_line(stderr: str, what: str, root_warning: bool) -> str:
    lines = stderr.splitlines()
    assert "Traceback" not in stderr, f"{what}: {stderr}"
    if root_warning:  # started as root: the warning may come first, once
        warned = [line for line in lines if "level=warn" in line and "running as root" in line]
        assert len(warned) <= 1, f"{what}: {stderr}"
        lines = [line for line in lines if line not in warned]
    assert len(lines) == 1, f"{what}: expected one line, got {lines}"
    assert "level=error" in lines[0], f"{what}: {lines[0]}"
    assert len(lines[0]) < 4096, f"{what}: a line of {len(lines[0])} characters"
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_config_is_one_clear_line(case: Case) -> None:
    with world_dir() as tmp:
        path = tmp / "kvm_exporter.yml"
        if case.id == "directory":
            path.mkdir()
        elif isinstance(case.content, bytes):
            path.write_bytes(case.content)
        elif case.content is not None:
            path.write_text(case.content)
        if path.is_file():
            path.chmod(case.mode)
        config = [f"--config.file={path}", *case.flags]
        if case.id.startswith("flag-"):
            config = list(case.flags)
        start = [f"--web.listen-address=127.0.0.1:{free_port()}"] if case.listen else []
        start += config
        runs = {"start as nobody": run(start, NOBODY)}
        if case.as_root:
            runs["check"] = run(["--config.check", *config], None)
            runs["start as root"] = run(start, None)
        results = {what: finish(proc, what) for what, proc in runs.items()}
        for what, (code, stderr) in results.items():
            assert code == 1, f"{what}: exited 0; stderr: {stderr}"
            line = the_line(stderr, what, root_warning=what == "start as root")
            for part in case.says:
                assert part.format(path=path) in line, f"{what}: {part!r} not in {line}"


def check_output(args: list[str], user: int | None) -> tuple[int, str, str]:
    proc = run(["--config.check", *args], user)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def test_good_config_checks_clean() -> None:
    """The counter-case: a valid file passes --config.check with exit 0, one line on stdout
    and nothing on stderr."""
    with world_dir() as tmp:
        path = tmp / "good.yml"
        path.write_text(
            "interval: 1h30m\nmax_series: 14\nlabels: [state]\nlog: {level: warn}\n"
            "web: {listen_address: ['127.0.0.1:1', '[::1]:1'], telemetry_path: /m}\n"
        )
        result = check_output([f"--config.file={path}", "--poll.interval=1d"], NOBODY)
        assert result == (0, f"{path}: configuration is valid\n", "")
        assert check_output([], NOBODY) == (0, "built-in defaults: configuration is valid\n", "")


def test_web_config_is_checked_fully_with_its_tls_files() -> None:
    """The web config gets a line of its own; a certificate OpenSSL refuses fails the check
    as it fails a start (the file exists and is readable: only loading it finds out)."""
    with world_dir() as tmp:
        write_pki(tmp)
        web = tmp / "web.yml"
        web.write_text("tls_server_config:\n  cert_file: server.pem\n  key_file: server-key.pem\n")
        for p in tmp.iterdir():
            p.chmod(0o644)
        flag = f"--web.config.file={web}"
        assert check_output([flag], NOBODY) == (
            0,
            f"built-in defaults: configuration is valid\n{web}: web configuration is valid\n",
            "",
        )
        (tmp / "server.pem").write_text("-----BEGIN CERTIFICATE-----\nnot one\n")
        code, out, err = check_output([flag], NOBODY)
        assert (code, out) == (1, "")
        line = the_line(err, "check", root_warning=False)
        assert f"{web}: tls_server_config.cert_file: " in line and "OpenSSL refused it" in line


def test_relative_files_in_the_config_are_beside_it() -> None:
    """Run from / (as systemd and daemon(8) run it): groups.config_file and web.config_file,
    relative in the config file, are read from its folder, and --config.check names every
    file it checked by its full path; a missing one is named by its full path too."""
    with world_dir() as tmp:
        write_pki(tmp)
        (tmp / "web.yml").write_text(
            "tls_server_config:\n  cert_file: server.pem\n  key_file: server-key.pem\n"
        )
        (tmp / "pe.yml").write_text("process_names:\n  - comm: [sshd]\n")
        config = tmp / "kvm.yml"
        for p in tmp.iterdir():
            p.chmod(0o644)
        config.write_text("groups:\n  config_file: pe.yml\nweb:\n  config_file: web.yml\n")
        assert check_output([f"--config.file={config}"], NOBODY) == (
            0,
            f"{config}: configuration is valid\n"
            f"{tmp}/pe.yml: process-exporter configuration is valid\n"
            f"{tmp}/web.yml: web configuration is valid\n",
            "",
        )
        for key in ("groups", "web"):
            config.write_text(f"{key}:\n  config_file: missing.yml\n")
            code, out, err = check_output([f"--config.file={config}"], NOBODY)
            assert (code, out) == (1, "")
            line = the_line(err, "check", root_warning=False)
            assert f"{tmp}/missing.yml: cannot read " in line, line


def test_shipped_config_checks_clean() -> None:
    shipped = Path(__file__).resolve().parent.parent / "config" / "kvm_exporter.yml"
    assert check_output([f"--config.file={shipped}"], None) == (
        0,
        f"{shipped}: configuration is valid\n",
        "",
    )
