"""config/kvm_exporter.service: systemd-analyze verify and security, its sandboxing keys and
restart policy, and its ExecStartPre/ExecStart/ExecReload command lines run for real as nobody
(systemd is not init here)."""

from __future__ import annotations

import re
import resource
import shlex
import shutil
import signal
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, free_port, samples, wait_until, wrapped_exporter_reads
from test_prometheus_fleet import exporter_command
from test_rcd import NOBODY, exporter_for_nobody

UNIT = REPO / "config" / "kvm_exporter.service"
INSTALLED_EXPORTER = "/opt/kvm_exporter/bin/kvm_exporter"
"""Where the README installs it: ProtectHome=yes hides /root and /home from the unit."""


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file, each a list of (key, value) in order: keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


SERVICE = parse_unit(UNIT.read_text())["Service"]


def values(key: str) -> list[str]:
    return [value for k, value in SERVICE if k == key]


def value(key: str) -> str:
    found = values(key)
    assert len(found) == 1, f"{key}= set {len(found)} times"
    return found[0]


def unit_copy(directory: Path, exporter: str) -> Path:
    """The unit with its exporter path replaced by ``exporter``, as ``directory``'s file."""
    unit = directory / "kvm_exporter.service"
    text = UNIT.read_text()
    assert text.count(INSTALLED_EXPORTER) == 3  # ExecStartPre, ExecStart, ExecReload
    unit.write_text(text.replace(INSTALLED_EXPORTER, exporter))
    return unit


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )


def test_systemd_analyze_verify_with_an_exporter_that_exists(tmp_path: Path) -> None:
    exporter = exporter_for_nobody(tmp_path)
    result = verify(unit_copy(tmp_path, str(exporter)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kvm_exporter" not in result.stdout + result.stderr
    # The counter-case: verify does look at the command (a path that is not there fails).
    missing = tmp_path / "missing"
    missing.mkdir()
    result = verify(unit_copy(missing, str(missing / "kvm_exporter")))
    assert result.returncode != 0 and str(missing / "kvm_exporter") in result.stderr


def test_systemd_analyze_security_rates_it_ok(tmp_path: Path) -> None:
    unit = tmp_path / "kvm_exporter.service"
    shutil.copy(UNIT, unit)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    level = re.search(
        r"Overall exposure level for kvm_exporter\.service: ([\d.]+) (\w+)", result.stdout
    )
    assert level, result.stdout
    assert float(level.group(1)) <= 2.0 and level.group(2) == "OK", result.stdout


def test_sandboxing_keys() -> None:
    assert value("DynamicUser") == "yes"
    assert value("User") == "kvm_exporter"
    for key, setting in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateMounts": "yes",
        "DevicePolicy": "closed",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectClock": "yes",
        "ProtectHostname": "yes",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "Restart": "on-failure",
        "Type": "exec",
        "SyslogIdentifier": "kvm_exporter",
    }.items():
        assert value(key) == setting, key
    assert values("ExecReload")[-1] == "/bin/kill -HUP $MAINPID"
    # /proc must show every process and its real owner.
    assert value("ProtectProc") == "default"
    assert value("ProcSubset") == "all"
    assert not values("PrivateUsers")
    assert not values("PrivateDevices"), "a private /dev hides the tty names"
    assert "@system-service" in values("SystemCallFilter")


def syscall_set(name: str) -> set[str]:
    """The system calls of systemd's set ``@name``, its nested sets expanded (systemd-analyze
    syscall-filter), or ``{name}`` for a system call."""
    if not name.startswith("@"):
        return {name}
    listing = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager", name],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    assert listing[0] == name, listing[:3]
    words = [line.strip() for line in listing[1:]]
    return set().union(*(syscall_set(w) for w in words if w and not w.startswith("#")))


def filter_allows() -> set[str]:
    """What the unit's SystemCallFilter= lines allow, merged as systemd.exec(5) says: the first
    (an allow list) sets the calls allowed, each later one adds its calls or, with ~, takes
    them away."""
    lines = values("SystemCallFilter")
    assert not lines[0].startswith("~")
    allowed: set[str] = set()
    for line in lines:
        calls = set().union(*(syscall_set(word) for word in line.lstrip("~").split()))
        allowed = allowed - calls if line.startswith("~") else allowed | calls
    return allowed


def test_the_system_call_filter_allows_raising_the_fd_limit(tmp_path: Path) -> None:
    """The README promises that a start raises the soft file descriptor limit towards the
    hard one: the system calls the real exporter makes for it (strace) and setrlimit (a C
    library without prlimit64 calls it) pass the unit's filter."""
    allowed = filter_allows()
    assert "openat" in allowed and not {"reboot", "sched_setscheduler"} & allowed
    trace, port = tmp_path / "trace", free_port()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard == resource.RLIM_INFINITY or hard > 256
    command = ["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=setrlimit,prlimit64"]
    strace = subprocess.Popen(
        [*command, *exporter_command(), f"--web.listen-address=127.0.0.1:{port}"],
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)),
    )
    limits = wrapped_exporter_reads(strace, port, "limits")
    soft = re.search(r"^Max open files +(\d+)", limits, re.M)
    assert soft and int(soft.group(1)) > 256, limits
    raised = re.findall(
        r"^\d+ +(\w+)\((?:0, )?RLIMIT_NOFILE, \{[^}]*\}.*= 0$", trace.read_text(), re.M
    )
    assert raised, trace.read_text()
    assert {*raised, "setrlimit"} <= allowed


def expand(line: str, env: dict[str, str]) -> list[str]:
    """A command line as systemd expands it: ``${VAR}`` is one word, ``$VAR`` is split on
    white space (an empty one is no word at all)."""
    words: list[str] = []
    for word in shlex.split(line):
        if re.fullmatch(r"\$\w+", word):
            words += env.get(word[1:], "").split()
        else:
            words.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word))
    return words


class Unit:
    """The unit's ExecStartPre, ExecStart and ExecReload lines, run as systemd would, as
    nobody, with this test's exporter in place of the installed one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.config = root / "kvm_exporter.yml"
        self.exporter = exporter_for_nobody(root)
        self.stderr_path = root / "stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {
            "PATH": "/usr/bin:/bin",
            "KVM_EXPORTER_CONFIG": str(self.config),
            "KVM_EXPORTER_ARGS": f"--web.listen-address=127.0.0.1:{self.port} --log.level=debug",
        }

    def command(self, line: str) -> list[str]:
        line = line.replace(INSTALLED_EXPORTER, str(self.exporter))
        return expand(line.replace("$MAINPID", "${MAINPID}"), self.env)

    def run(self, line: str) -> subprocess.CompletedProcess[str]:
        """An Exec*= line run to its end, as nobody."""
        return subprocess.run(
            self.command(line),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
            user=NOBODY,
            group=NOBODY,
            extra_groups=[NOBODY],
        )

    def pre(self) -> subprocess.CompletedProcess[str]:
        return self.run(value("ExecStartPre"))

    def start(self) -> int:
        assert self.pre().returncode == 0, self.pre().stderr
        with open(self.stderr_path, "ab") as stderr:
            self.proc = subprocess.Popen(
                self.command(value("ExecStart")),
                env=self.env,
                stderr=stderr,
                cwd="/",
                user=NOBODY,
                group=NOBODY,
                extra_groups=[NOBODY],
            )
        wait_until(lambda: "kvm_processes" in self.metrics(), timeout=20, what="/metrics")
        return self.proc.pid

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    def labels(self) -> set[str]:
        return {
            n for (m, labels) in samples(self.metrics()) if m == "kvm_processes" for n, _ in labels
        }

    def reload(self, mainpid: int) -> int:
        """systemctl reload: each ExecReload line in turn, stopping at the first failure."""
        self.env["MAINPID"] = str(mainpid)
        for line in values("ExecReload"):
            code = self.run(line).returncode
            if code != 0:
                return code
        return 0

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)  # systemctl stop: KillSignal=SIGTERM
        return self.proc.wait(timeout=float(value("TimeoutStopSec").rstrip("s")))


@pytest.fixture
def unit() -> Iterator[Unit]:
    # Not tmp_path: pytest's base directory is closed to nobody, who reads the config.
    root = Path(tempfile.mkdtemp(prefix="kvm-unit-"))
    try:
        root.chmod(0o755)
        u = Unit(root)
        yield u
        if u.proc is not None and u.proc.poll() is None:
            u.proc.kill()
            u.proc.wait()
    finally:
        shutil.rmtree(root)


def test_exec_start_uses_the_config_and_reload_rereads_it(unit: Unit) -> None:
    unit.config.write_text("interval: 500ms\n")
    unit.config.chmod(0o644)
    mainpid = unit.start()
    # exec: the process systemd started is the exporter, so $MAINPID gets the signals.
    cmdline = Path(f"/proc/{mainpid}/cmdline").read_text().split("\0")
    assert str(unit.exporter) in cmdline
    assert f"--config.file={unit.config}" in cmdline
    assert f"--web.listen-address=127.0.0.1:{unit.port}" in cmdline
    assert Path(f"/proc/{mainpid}/status").read_text().count(f"Uid:\t{NOBODY}\t") == 1
    assert unit.labels() == {"user", "tty", "state"}

    unit.config.write_text("interval: 500ms\nlabels: [state]\n")
    assert unit.reload(mainpid) == 0
    wait_until(lambda: unit.labels() == {"state"}, timeout=30, what="labels after ExecReload")
    # A bad config fails the reload's check: no SIGHUP is sent, the running config stays.
    unit.config.write_text("interval: 500ms\nlabels: [pid]\n")
    assert unit.reload(mainpid) == 1
    assert unit.labels() == {"state"}
    assert unit.proc is not None and unit.proc.poll() is None
    assert unit.stop() == 0
    log = unit.stderr_path.read_text()
    assert log.count("configuration reloaded") == 1 and "level=error" not in log


def restart_prevented(code: int) -> bool:
    """Whether Restart=on-failure leaves a main process that exited with ``code`` dead."""
    prevented = {int(c) for line in values("RestartPreventExitStatus") for c in line.split()}
    return code in prevented


@pytest.mark.parametrize(
    ("config", "says"),
    [
        (None, "kvm_exporter.yml: cannot read config file: No such file or directory"),
        ("labels: [pid]\n", "kvm_exporter.yml: labels: got ['pid']"),
        ("procfs: {root: /nonexistent}\n", "/nonexistent does not look like procfs"),
    ],
)
def test_a_bad_or_missing_config_fails_the_start_and_is_not_restarted(
    unit: Unit, config: str | None, says: str
) -> None:
    """A mistyped config path is an error, not the built-in defaults; ExecStartPre says so in
    one line, and should the main process meet it anyway, its exit status stops restarts."""
    if config is not None:
        unit.config.write_text(config)
        unit.config.chmod(0o644)
    pre = unit.pre()
    assert pre.returncode == 1 and pre.stdout == ""
    (line,) = pre.stderr.splitlines()
    assert "level=error" in line and says in line
    main = unit.run(value("ExecStart"))
    assert main.returncode == 1 and says in main.stderr
    assert restart_prevented(main.returncode)


def test_a_crash_is_restarted_and_restarts_are_bounded() -> None:
    from kvm_exporter.logs import EXIT_CRASH

    assert value("Restart") == "on-failure" and not restart_prevented(EXIT_CRASH)
    unit_section = dict(parse_unit(UNIT.read_text())["Unit"])
    burst = int(unit_section["StartLimitBurst"])
    interval = float(unit_section["StartLimitIntervalSec"].rstrip("s"))
    # The limit can only trip if `burst` starts, RestartSec apart, fit in the interval.
    assert burst >= 2 and burst * float(value("RestartSec").rstrip("s")) < interval


def test_readme_installs_the_exporter_where_the_unit_runs_it() -> None:
    """The README's steps: a venv at the unit's path, from a Python the sandbox can see."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Linux (systemd)") : readme.index("## TLS and basic auth")]
    venv = str(Path(INSTALLED_EXPORTER).parent.parent)
    assert f"/usr/bin/python3 -m venv {venv} && {venv}/bin/pip install ." in section
    config = "/etc/kvm_exporter/kvm_exporter.yml"
    assert f"Environment=KVM_EXPORTER_CONFIG={config}" in UNIT.read_text()
    assert f"install -D -m 0644 config/kvm_exporter.yml {config}" in section
    assert not [word for _, line in SERVICE for word in line.split() if word.startswith("/root")]
