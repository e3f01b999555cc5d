"""rc.d/kvm_exporter driven through the rc.subr harness and daemon(8)/su(1) stand-ins of
tests/rcsubr.

The script under test is the shipped file with two paths rewritten (/etc/rc.subr and
/usr/sbin/daemon) and the su(1) stand-in first in PATH; everything else, the real exporter
included, runs as on FreeBSD: as root, with kvm_exporter_user=nobody, on a free loopback port.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, SYSTEM_PYTHON, free_port, listens, samples, wait_until

SCRIPT = REPO / "rc.d" / "kvm_exporter"
HARNESS = REPO / "tests" / "rcsubr"
NOBODY = 65534
BAD_CONFIG = "labels: [user, bogus]\n"
# service(8)'s PATH; the su(1) stand-in goes before it.
SERVICE_PATH = "/sbin:/bin:/usr/sbin:/usr/bin:/usr/local/sbin:/usr/local/bin"
RC_SUBR_LINES = (". /etc/rc.subr", 'load_rc_config "${name}"', 'run_rc_command "$1"')


def as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` with nobody's ids, as the daemon(8) stand-in drops to them."""
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=60,
        user=NOBODY,
        group=NOBODY,
        extra_groups=[NOBODY],
        env={"PATH": "/usr/bin:/bin"},
    )


def exporter_for_nobody(bin_dir: Path) -> Path:
    """A kvm_exporter executable that nobody can run, as the port installs one.

    The installed console script when nobody can run it (a venv made from Debian's python);
    else a launcher of the same shape on Debian's python, reading this interpreter's
    site-packages (pyenv under /root is closed to other users)."""
    console = Path(sys.executable).parent / "kvm_exporter"
    try:
        if as_nobody(str(console), "--version").returncode == 0:
            return console
    except OSError:
        pass
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    probe = as_nobody(SYSTEM_PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])")
    assert probe.stdout.strip() == version, (
        f"nobody cannot run {sys.executable}, and {SYSTEM_PYTHON} is not Python {version}: "
        f"{probe.stdout}{probe.stderr}"
    )
    import site

    launcher = bin_dir / "kvm_exporter"
    launcher.write_text(
        f"#!{SYSTEM_PYTHON}\n"
        "import site\nimport sys\n\n"
        f"for path in {site.getsitepackages()!r}:\n"
        "    site.addsitedir(path)\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from kvm_exporter.cli import main\n\n"
        "sys.exit(main())\n"
    )
    launcher.chmod(0o755)
    check = as_nobody(str(launcher), "--version")
    assert check.returncode == 0, f"nobody cannot run {launcher}: {check.stderr}"
    return launcher


class Service:
    """The rc.d script installed in a temporary root, with its rc.conf and syslog."""

    def __init__(self, root: Path, command: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = root / "kvm_exporter.yml"
        self.run_dir = root / "run"
        self.pidfile = self.run_dir / "kvm_exporter.pid"
        self.child_pidfile = self.run_dir / "kvm_exporter.child.pid"
        self.syslog = root / "syslog"
        self.rc_conf = root / "rc.conf"
        self.script = root / "kvm_exporter"
        self.shell: tuple[str, ...] = ()
        """The shell running the script; () runs it by its #!/bin/sh, dash on Debian."""
        self.login_shell = "/bin/sh"
        """Root's login shell as su(1) sees it (tests/rcsubr/bin/su): FreeBSD 14's."""
        text = SCRIPT.read_text()
        for real, stand_in in (
            ("/etc/rc.subr", HARNESS / "rc.subr"),
            ("/usr/sbin/daemon", HARNESS / "daemon"),
        ):
            assert text.count(real) == 1, f"{real} should appear once in {SCRIPT}"
            text = text.replace(real, str(stand_in))
        self.script.write_text(text)
        self.script.chmod(0o755)
        self.settings = {
            "kvm_exporter_enable": "YES",
            "kvm_exporter_user": "nobody",
            "kvm_exporter_config": str(self.config),
            "kvm_exporter_listen_address": f"127.0.0.1:{self.port}",
            "kvm_exporter_pidfile": str(self.pidfile),
            "kvm_exporter_command": str(command),
            "kvm_exporter_args": "--log.level=debug",
        }
        self.write_rc_conf()

    def write_rc_conf(self, **changes: str | None) -> None:
        """Update rc.conf; None removes a variable. Values are single-quoted, as-is."""
        for key, value in changes.items():
            if value is None:
                self.settings.pop(key, None)
            else:
                self.settings[key] = value
        lines = [f"{key}={shlex.quote(value)}" for key, value in self.settings.items()]
        self.rc_conf.write_text("\n".join(lines) + "\n")

    def write_config(self, text: str) -> None:
        self.config.write_text(text)
        self.config.chmod(0o644)

    def rc(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``service kvm_exporter COMMAND``: service(8) runs the script in a clean env."""
        env = {
            "HOME": "/",
            "PATH": f"{HARNESS / 'bin'}:{SERVICE_PATH}",
            "RCSUBR_RC_CONF": str(self.rc_conf),
            "RCSUBR_SYSLOG": str(self.syslog),
            "RCSUBR_LOGIN_SHELL": self.login_shell,
        }
        return subprocess.run(
            [*self.shell, str(self.script), command],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )

    def pid(self, pidfile: Path) -> int:
        return int(pidfile.read_text().split()[0])

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            return str(response.read().decode())

    def serving(self) -> bool:
        """The exporter this service started answers /metrics (another suite's exporter may
        hold the port if ours could not bind it: the child pidfile's process must)."""
        child = pid_in(self.child_pidfile)
        if child is None or not listens(child, self.port):
            return False
        try:
            return "kvm_processes" in self.metrics_text()
        except OSError:
            return False

    def log(self) -> str:
        return self.syslog.read_text() if self.syslog.exists() else ""

    def kill_leftovers(self) -> None:
        for pidfile in (self.pidfile, self.child_pidfile):
            try:
                pid = self.pid(pidfile)
                if str(self.root) in Path(f"/proc/{pid}/cmdline").read_text():
                    os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError, IndexError):
                pass


def pid_in(pidfile: Path) -> int | None:
    """The pid in ``pidfile``, None while it is missing or being rewritten.

    daemon(8) writes the child's pid after it returns, and rewrites it as pidfile_write(3)
    does: truncate, then write."""
    try:
        words = pidfile.read_text().split()
    except FileNotFoundError:
        return None
    return int(words[0]) if words else None


def ids(pid: int) -> dict[str, list[int]]:
    """The Uid:, Gid: and Groups: lines of /proc/PID/status."""
    status = Path(f"/proc/{pid}/status").read_text()
    return {
        key: [int(v) for v in rest.split()]
        for key, rest in re.findall(r"^(Uid|Gid|Groups):[ \t]*(.*)$", status, re.M)
    }


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return (
        Path(f"/proc/{pid}").exists() and "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    )


def processes_labels(text: str) -> set[str]:
    """Label names of the kvm_processes series."""
    return {
        name
        for (metric, labels) in samples(text)
        if metric == "kvm_processes"
        for name, _ in labels
    }


@pytest.fixture
def service() -> Iterator[Service]:
    assert os.geteuid() == 0, "the rc.d tests run the script as root, as rc(8) does"
    # Not tmp_path: pytest's base directory is closed to nobody, who reads the config.
    root = Path(tempfile.mkdtemp(prefix="kvm-rcd-"))
    try:
        root.chmod(0o755)
        (root / "bin").mkdir(mode=0o755)
        svc = Service(root, exporter_for_nobody(root / "bin"))
        svc.write_config("interval: 500ms\n")
        yield svc
        try:
            if svc.pidfile.exists():
                svc.rc("onestop")
        finally:
            svc.kill_leftovers()
    finally:
        shutil.rmtree(root)


def start(svc: Service, command: str = "start") -> tuple[int, int]:
    """Start, wait until /metrics answers; the supervisor's and the exporter's pids."""
    result = svc.rc(command)
    assert result.returncode == 0, result
    assert "Starting kvm_exporter." in result.stdout
    wait_until(svc.serving, timeout=20, what=f"/metrics on {svc.url}\n{svc.log()}")
    return svc.pid(svc.pidfile), svc.pid(svc.child_pidfile)


@pytest.mark.parametrize("path", [SCRIPT, HARNESS / "rc.subr"], ids=["rc.d", "rc.subr"])
def test_shellcheck_clean(path: Path) -> None:
    result = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def top_level_statements(text: str) -> list[str]:
    """The script's statements outside function bodies, without comments and blank lines;
    a statement continued with a backslash is one string."""
    statements: list[str] = []
    in_function = continued = False
    for line in text.splitlines():
        if re.match(r"^\w+\(\)$", line):
            in_function = True
        elif in_function:
            in_function = line != "}"
        elif line.strip() and not line.startswith("#"):
            if continued:
                statements[-1] += "\n" + line
            else:
                statements.append(line)
            continued = line.endswith("\\")
    return statements


def test_script_follows_the_ports_convention() -> None:
    text = SCRIPT.read_text()
    for line in ("# PROVIDE: kvm_exporter", "# REQUIRE: LOGIN", "# KEYWORD: shutdown"):
        assert re.search(f"^{re.escape(line)}$", text, re.M), line
    assert subprocess.run(["sh", "-n", str(SCRIPT)]).returncode == 0
    statements = top_level_statements(text)
    for line in (
        ". /etc/rc.subr",
        "name=kvm_exporter",
        "rcvar=kvm_exporter_enable",
        'load_rc_config "${name}"',
        'run_rc_command "$1"',
        ': ${kvm_exporter_enable:="NO"}',
    ):
        assert line in statements, line
    # Porter's Handbook: ":=" for _enable only, "=" elsewhere (an empty value stays empty).
    defaults = [line for line in statements if line.startswith(":")]
    assert len(defaults) >= 8
    for line in defaults:
        if "_enable" not in line:
            assert re.fullmatch(r': \$\{kvm_exporter_\w+="[^"]*"\}', line), line
    # Outside functions only rc.subr's own lines, defaults, plain assignments and a file
    # test that empties a variable: nothing that runs a command or changes the system.
    for statement in statements:
        assert (
            statement in RC_SUBR_LINES
            or re.fullmatch(r'\[ -f "\$\{\w+\}" \] \|\| \w+=', statement)
            or (
                re.match(r"^(: \$\{\w+:?=|\w+=)", statement)
                and not re.search(r"\$\(|`|;|&&|\|\|", statement)
            )
        ), statement
    # dist turns /usr/local into %%PREFIX%%: it may only name files the port installs.
    for match in re.finditer(r"/usr/local\S*", text):
        assert re.match(r"/usr/local/(bin/kvm_exporter|etc/kvm_exporter\.yml)\b", match.group()), (
            match.group()
        )


def test_start_status_reload_stop(service: Service) -> None:
    svc = service
    assert svc.rc("status").stdout == "kvm_exporter is not running.\n"
    supervisor, child = start(svc)

    status = svc.rc("status")
    assert (status.returncode, status.stdout) == (
        0,
        f"kvm_exporter is running as pid {supervisor}.\n",
    )
    # daemon(8) keeps root to supervise; the exporter runs as the configured user.
    assert ids(supervisor)["Uid"] == [0, 0, 0, 0]
    assert ids(child)["Uid"] == [NOBODY] * 4
    assert ids(child)["Gid"] == [NOBODY] * 4
    assert ids(child)["Groups"] == [NOBODY]
    assert Path(f"/proc/{child}/status").read_text().count(f"PPid:\t{supervisor}\n") == 1
    cmdline = Path(f"/proc/{child}/cmdline").read_text().split("\0")
    assert f"--config.file={svc.config}" in cmdline
    assert f"--web.listen-address=127.0.0.1:{svc.port}" in cmdline
    assert "--log.level=debug" in cmdline
    run_dir = svc.run_dir.stat()  # kvm_exporter_group unset: nobody's login group
    assert (run_dir.st_uid, run_dir.st_gid, run_dir.st_mode & 0o777) == (0, NOBODY, 0o755)
    assert svc.pidfile.stat().st_uid == 0

    assert processes_labels(svc.metrics_text()) == {"user", "tty", "state"}
    assert re.search(r"^daemon\.notice kvm_exporter: .*listening", svc.log(), re.M), svc.log()

    svc.write_config("interval: 500ms\nlabels: [state]\n")
    reload = svc.rc("reload")
    assert reload.returncode == 0, reload
    assert "Reloading kvm_exporter configuration." in reload.stdout
    wait_until(lambda: processes_labels(svc.metrics_text()) == {"state"}, what="reloaded labels")
    assert svc.pid(svc.child_pidfile) == child, "reload must not restart the exporter"

    # A bad config is refused before the signal; the running one keeps serving.
    svc.write_config(BAD_CONFIG)
    refused = svc.rc("reload")
    assert (refused.returncode, refused.stdout) == (1, ""), refused
    assert "bogus" in refused.stderr
    assert processes_labels(svc.metrics_text()) == {"state"}

    again = svc.rc("start")
    assert again.returncode == 1
    assert f"kvm_exporter already running? (pid={supervisor})." in again.stderr

    svc.write_config("interval: 500ms\nlabels: [user, state]\n")
    restart = svc.rc("restart")
    assert restart.returncode == 0, restart
    assert "Stopping kvm_exporter." in restart.stdout and "Starting" in restart.stdout
    assert not alive(supervisor) and not alive(child)
    wait_until(svc.serving, timeout=20, what="/metrics after restart")
    assert processes_labels(svc.metrics_text()) == {"user", "state"}
    supervisor, child = svc.pid(svc.pidfile), svc.pid(svc.child_pidfile)

    stop = svc.rc("stop")
    assert stop.returncode == 0, stop
    assert stop.stdout.startswith("Stopping kvm_exporter.\n")
    assert not alive(supervisor) and not alive(child)
    assert not svc.pidfile.exists() and not svc.child_pidfile.exists()
    assert not svc.serving()
    assert "received SIGTERM" in svc.log()
    gone = svc.rc("status")
    assert (gone.returncode, gone.stdout) == (1, "kvm_exporter is not running.\n")
    not_running = svc.rc("stop")
    assert not_running.returncode == 1
    assert f"kvm_exporter not running? (check {svc.pidfile})." in not_running.stderr


def test_checkconfig(service: Service) -> None:
    svc = service
    good = svc.rc("checkconfig")
    assert (good.returncode, good.stdout) == (0, f"{svc.config}: configuration is valid\n")

    svc.write_config(BAD_CONFIG)
    bad = svc.rc("checkconfig")
    assert bad.returncode == 1
    assert f"{svc.config}: labels: got ['user', 'bogus']" in bad.stderr
    refused = svc.rc("start")
    assert refused.returncode == 1
    assert "failed precmd routine for kvm_exporter" in refused.stderr
    assert not svc.pidfile.exists()

    # Said with printf: dash's echo would make the "\\t" a tab.
    absent = svc.root / "absent\\tconfig.yml"
    svc.write_rc_conf(kvm_exporter_config=str(absent))
    missing = svc.rc("checkconfig")
    assert missing.returncode == 0, missing
    assert f"{absent} does not exist: built-in defaults apply." in missing.stdout
    assert "built-in defaults: configuration is valid" in missing.stdout


def test_runs_on_defaults_without_a_config_file(service: Service) -> None:
    svc = service
    svc.config.unlink()
    _, child = start(svc)
    cmdline = Path(f"/proc/{child}/cmdline").read_text().split("\0")
    assert not [arg for arg in cmdline if arg.startswith("--config.file")]
    assert processes_labels(svc.metrics_text()) == {"user", "tty", "state"}
    assert svc.rc("stop").returncode == 0


def test_daemon_restarts_a_dead_exporter(service: Service) -> None:
    svc = service
    supervisor, child = start(svc)
    os.kill(child, signal.SIGKILL)
    # -R 5: a new exporter about five seconds later, under the same supervisor.
    wait_until(
        lambda: pid_in(svc.child_pidfile) not in (None, child),
        timeout=15,
        what="a restarted exporter",
    )
    wait_until(svc.serving, timeout=20, what="/metrics after the restart")
    restarted = svc.pid(svc.child_pidfile)
    assert ids(restarted)["Uid"] == [NOBODY] * 4
    assert svc.pid(svc.pidfile) == supervisor
    assert svc.rc("stop").returncode == 0
    assert not alive(restarted)


def test_disabled_service_needs_onestart(service: Service) -> None:
    svc = service
    svc.write_rc_conf(kvm_exporter_enable="NO")
    refused = svc.rc("start")
    # rc.subr returns 0 here: a disabled service is not an error at boot.
    assert refused.returncode == 0
    assert refused.stdout == (
        "Cannot 'start' kvm_exporter. Set kvm_exporter_enable to YES in /etc/rc.conf "
        "or use 'onestart' instead of 'start'.\n"
    )
    assert not svc.pidfile.exists() and not svc.serving()
    assert "use 'onecheckconfig' instead of 'checkconfig'" in svc.rc("checkconfig").stdout
    assert svc.rc("onecheckconfig").stdout == f"{svc.config}: configuration is valid\n"

    supervisor, _ = start(svc, "onestart")
    assert svc.rc("status").stdout == f"kvm_exporter is running as pid {supervisor}.\n"
    assert "Cannot 'reload'" in svc.rc("reload").stdout
    assert svc.rc("onereload").returncode == 0
    assert svc.rc("onestop").returncode == 0
    assert not alive(supervisor)


@pytest.mark.parametrize("user", ["root", "0"])
def test_refuses_to_run_as_root(service: Service, user: str) -> None:
    svc = service
    svc.write_rc_conf(kvm_exporter_user=user)
    result = svc.rc("start")
    assert result.returncode == 1
    assert "refusing to run kvm_exporter as root" in result.stderr
    assert "set kvm_exporter_user to an unprivileged user" in result.stderr
    assert not svc.pidfile.exists() and not svc.serving()


def test_refuses_an_unknown_user(service: Service) -> None:
    svc = service
    svc.write_rc_conf(kvm_exporter_user="no-such-kvm-user")
    result = svc.rc("start")
    assert result.returncode == 1
    assert "user 'no-such-kvm-user' does not exist" in result.stderr
    assert not svc.pidfile.exists()


def options(svc: Service, *args: str) -> list[str]:
    """The exporter's flags for this service's rc.conf, ``args`` standing for its args."""
    return [f"--web.listen-address=127.0.0.1:{svc.port}", f"--config.file={svc.config}", *args]


def test_force_starts_with_every_flag_when_the_check_fails(service: Service) -> None:
    """Issue 20 rc.d 6: rc.subr goes on past a failing precmd under force; the exporter's
    command line must not depend on it (it was the bare exporter: every interface, no config,
    no web config)."""
    svc = service
    command = stand_in_exporter(svc, "exec sleep 600", check="exit 1")
    svc.write_rc_conf(kvm_exporter_command=str(command))
    refused = svc.rc("start")
    assert "failed precmd routine for kvm_exporter" in refused.stderr, refused
    assert not svc.pidfile.exists()
    check = ["--config.check", *options(svc, "--log.level=debug")]
    run = options(svc, "--log.level=debug")
    expected = [check]
    # forcestart: its check, then the exporter; forcerestart: its own check, then forcestart's.
    for forced, runs in (("forcestart", [check, run]), ("forcerestart", [check, check, run])):
        result = svc.rc(forced)
        assert result.returncode == 0, result
        expected += runs
        wait_for_invocations(svc, expected)
    assert ids(svc.pid(svc.child_pidfile))["Uid"] == [NOBODY] * 4


@pytest.mark.parametrize(
    "command",
    ["start", "forcestart", "checkconfig", "forcecheckconfig"]
    + ["restart", "forcerestart", "reload", "forcereload"],
)
def test_root_is_refused_in_every_path(service: Service, command: str) -> None:
    """Issue 20 rc.d 6: under force rc.subr ignores a failing precmd, so refusing root there
    must end the script (rc.subr's err); a running exporter is left as it is."""
    svc = service
    svc.write_rc_conf(kvm_exporter_command=str(stand_in_exporter(svc, "exec sleep 600")))
    running = command.endswith(("restart", "reload"))
    if running:
        assert svc.rc("start").returncode == 0
        child = wait_until(lambda: pid_in(svc.child_pidfile), what="the exporter")
        wait_until(lambda: len(invocations(svc)) == 2, what="the exporter's start")
    svc.write_rc_conf(kvm_exporter_user="root")
    result = svc.rc(command)
    assert result.returncode == 1, result
    assert "refusing to run kvm_exporter as root" in result.stderr
    if running:
        time.sleep(0.5)  # a SIGHUP would have ended the stand-in by now
        assert pid_in(svc.child_pidfile) == child and alive(child)
        assert ids(child)["Uid"] == [NOBODY] * 4
        assert len(invocations(svc)) == 2
    else:
        assert not svc.pidfile.exists()
        assert invocations(svc) == []


@pytest.mark.parametrize("login_shell", ["/bin/sh", "/bin/tcsh", "/bin/csh"])
@pytest.mark.parametrize("shell", [("dash",), ("bash", "--posix")], ids=["dash", "bash-posix"])
def test_args_reach_the_check_and_the_exporter_as_written(
    service: Service, shell: tuple[str, ...], login_shell: str
) -> None:
    """Issue 20 rc.d 9, 10: a "!" under su -m when root's login shell is csh (FreeBSD 13 and
    older: history substitution, quoted or not), "\\t" and "\\c" under dash (its echo makes
    them a tab and an end of output), and quotes, spaces and "$", as sh reads them in
    kvm_exporter_args."""
    svc = service
    svc.shell, svc.login_shell = shell, login_shell
    command = stand_in_exporter(svc, "exec sleep 600")
    svc.write_rc_conf(
        kvm_exporter_command=str(command),
        kvm_exporter_args="--web.telemetry-path='/a!b\\tc\\cd $HOME' --log.level=\"debug\"",
    )
    result = svc.rc("start")
    assert result.returncode == 0, result
    flags = options(svc, "--web.telemetry-path=/a!b\\tc\\cd $HOME", "--log.level=debug")
    wait_for_invocations(svc, [["--config.check", *flags], flags])


def test_a_config_path_with_a_space_and_quotes(service: Service) -> None:
    """Issue 20 rc.d 7: the exporter and its check read a config file whose path has a space
    (and quotes and a "$"), once split into two words."""
    svc = service
    config_dir = svc.root / "with space 'q' \"d\" $x"
    config_dir.mkdir(mode=0o755)
    svc.config = config_dir / "kvm_exporter.yml"
    svc.write_config("interval: 500ms\nlabels: [state]\n")
    svc.write_rc_conf(kvm_exporter_config=str(svc.config))
    check = svc.rc("checkconfig")
    assert (check.returncode, check.stdout) == (0, f"{svc.config}: configuration is valid\n")
    _, child = start(svc)
    assert f"--config.file={svc.config}" in Path(f"/proc/{child}/cmdline").read_text().split("\0")
    assert processes_labels(svc.metrics_text()) == {"state"}


def test_flags_and_program_are_the_exporters(service: Service) -> None:
    """Issue 20 rc.d 11: rc.subr hands ${name}_flags to daemon(8) (which refuses them) and runs
    ${name}_program in its place; an admin means both for the exporter."""
    svc = service
    command = stand_in_exporter(svc, "exec sleep 600")
    svc.write_rc_conf(
        kvm_exporter_command="/nonexistent",
        kvm_exporter_program=str(command),
        kvm_exporter_flags="--poll.interval=1s",
    )
    check = svc.rc("checkconfig")
    assert check.returncode == 0, check
    result = svc.rc("start")
    assert result.returncode == 0, result
    flags = options(svc, "--log.level=debug", "--poll.interval=1s")
    expected = [["--config.check", *flags], ["--config.check", *flags], flags]
    wait_for_invocations(svc, expected)


def test_faststop_is_silent_when_nothing_runs(service: Service) -> None:
    """Issue 20 rc.d 10: rc.shutdown runs faststop; rc.subr's own stop returns 0 and says
    nothing there when there is no pid, where stop says "not running?"."""
    svc = service
    faststop = svc.rc("faststop")
    assert (faststop.returncode, faststop.stdout, faststop.stderr) == (0, "", ""), faststop
    svc.write_rc_conf(kvm_exporter_command=str(stand_in_exporter(svc, "exec sleep 600")))
    assert svc.rc("start").returncode == 0
    supervisor = svc.pid(svc.pidfile)
    assert svc.rc("faststop").returncode == 0
    assert not alive(supervisor) and not svc.pidfile.exists()


def test_restart_with_an_invalid_config_keeps_the_exporter(service: Service) -> None:
    """Issue 12 rc.d 1: rc.subr runs restart_precmd before stopping, the check goes there."""
    svc = service
    supervisor, child = start(svc)
    svc.write_config(BAD_CONFIG)
    restart = svc.rc("restart")
    assert (restart.returncode, restart.stdout) == (1, ""), restart
    assert "bogus" in restart.stderr
    assert alive(supervisor) and alive(child)
    assert svc.pid(svc.child_pidfile) == child
    assert svc.serving()


def test_the_config_file_listen_address_applies_when_the_variable_is_unset(
    service: Service,
) -> None:
    """Issue 12 rc.d 2: --web.listen-address only when kvm_exporter_listen_address is set."""
    svc = service
    svc.write_rc_conf(kvm_exporter_listen_address=None)
    svc.write_config(f"interval: 500ms\nweb:\n  listen_address: 127.0.0.1:{svc.port}\n")
    _, child = start(svc)
    cmdline = Path(f"/proc/{child}/cmdline").read_text().split("\0")
    assert not [arg for arg in cmdline if arg.startswith("--web.listen-address")], cmdline


def tls_files(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate and its key (mode 0600, root's) made by openssl."""
    cert, key = directory / "server.pem", directory / "server-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-subj", "/CN=server", "-days", "1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    cert.chmod(0o644)
    key.chmod(0o600)
    return cert, key


@pytest.mark.parametrize("unreadable", ["config", "tls key"])
def test_the_check_runs_as_the_service_user(service: Service, unreadable: str) -> None:
    """Issue 12 rc.d 3: what nobody cannot read fails checkconfig and start, not the exporter."""
    svc = service
    if unreadable == "config":
        svc.config.chmod(0o600)
        missing = str(svc.config)
    else:
        _, key = tls_files(svc.root)
        web = svc.root / "web.yml"
        web.write_text("tls_server_config:\n  cert_file: server.pem\n  key_file: server-key.pem\n")
        web.chmod(0o644)
        svc.write_rc_conf(kvm_exporter_args=f"--web.config.file={web}")
        missing = str(key)
    check = svc.rc("checkconfig")
    assert check.returncode == 1, check
    assert missing in check.stderr and "Permission denied" in check.stderr, check.stderr
    refused = svc.rc("start")
    assert refused.returncode == 1, refused
    assert "failed precmd routine for kvm_exporter" in refused.stderr
    assert not svc.pidfile.exists()


def test_args_are_read_with_eval_by_check_and_start_alike(service: Service) -> None:
    """Issue 12 rc.d 4: rc.subr's start evals command_args; the check reads the args so too,
    in the same shell: a variable of rc.conf that is not exported (left unexpanded there by
    single quotes) is seen by both."""
    svc = service
    svc.write_rc_conf(
        kvm_exporter_args="--log.level=\"${kvm_exporter_level}\" --web.telemetry-path='/metrics'",
        kvm_exporter_level="debug",
    )
    check = svc.rc("checkconfig")
    assert check.returncode == 0, check
    _, child = start(svc)
    cmdline = Path(f"/proc/{child}/cmdline").read_text().split("\0")
    assert "--log.level=debug" in cmdline and "--web.telemetry-path=/metrics" in cmdline


def stand_in_exporter(svc: Service, body: str, check: str = "exit 0") -> Path:
    """An executable for kvm_exporter_command: it runs ``check`` for --config.check and
    ``body`` otherwise, and first adds its arguments to the list :func:`invocations` reads."""
    path = svc.root / "bin" / "stand_in"
    log = svc.root / "argv"
    log.touch(mode=0o666)
    log.chmod(0o666)  # the service user writes it
    path.write_text(
        f"#!/bin/sh\nprintf '%s\\0' \"$@\" >> {log}\necho >> {log}\n"
        f'case "$1" in --config.check) {check} ;; esac\n{body}\n'
    )
    path.chmod(0o755)
    return path


def invocations(svc: Service) -> list[list[str]]:
    """The argument lists :func:`stand_in_exporter` was run with, oldest first."""
    runs = (svc.root / "argv").read_text().splitlines()
    return [run.split("\0")[:-1] for run in runs]


def wait_for_invocations(svc: Service, expected: list[list[str]]) -> None:
    """Wait until :func:`invocations` are ``expected`` (daemon(8) runs the exporter after
    the rc.d script returns)."""
    wait_until(lambda: invocations(svc) == expected, what=f"{expected}, not {invocations(svc)}")


def test_stop_ends_while_the_exporter_crash_loops(service: Service) -> None:
    """Issue 12 rc.d 5: daemon(8) loses a SIGTERM sent during its -R 5 sleep; stop still ends."""
    svc = service
    with socket.socket() as taken:  # the exporter exits at once: its port is in use
        taken.bind(("127.0.0.1", svc.port))
        taken.listen()
        assert svc.rc("start").returncode == 0
        supervisor = svc.pid(svc.pidfile)
        child = wait_until(lambda: pid_in(svc.child_pidfile), what="a first exporter")
        wait_until(lambda: not alive(child), timeout=20, what=f"the exporter to fail\n{svc.log()}")
        assert alive(supervisor)  # asleep before the restart
        stop = svc.rc("stop", timeout=40)
    assert stop.returncode == 0, stop
    # Gone at once after SIGTERM; after SIGKILL (a machine so loaded that the 10 s ran out)
    # stop does not wait for init to reap it.
    wait_until(lambda: not alive(supervisor), what="the supervisor to go")
    assert not svc.pidfile.exists() and not svc.child_pidfile.exists()
    assert "address already in use" in svc.log().lower(), svc.log()


TERM_LOGGER = (
    "import signal, sys, time; "
    "signal.signal(signal.SIGTERM, lambda *_: print(time.time(), file=open(sys.argv[1], 'a')))\n"
    "while True: signal.pause()"
)
"""An exporter that ignores SIGTERM but for writing down when each one came (argv[1])."""


def stop_a_sigterm_deaf_exporter(svc: Service, terms: Path) -> tuple[float, float]:
    """Start the :data:`TERM_LOGGER` exporter, stop it 0.3 s into a second; the times of its
    first SIGTERM and of the end of stop."""
    assert svc.rc("start").returncode == 0
    supervisor = svc.pid(svc.pidfile)
    child = wait_until(lambda: pid_in(svc.child_pidfile), what="the stand-in exporter")
    wait_until(
        lambda: "signal.pause" in Path(f"/proc/{child}/cmdline").read_text(),
        what="the stand-in's SIGTERM handler",
    )
    wait_until(lambda: 0.3 <= time.time() % 1 < 0.4, what="0.3 s into a second")
    stop = svc.rc("stop", timeout=40)
    stopped = time.time()
    assert stop.returncode == 0, stop
    assert "kvm_exporter did not stop in 1 s: sending SIGKILL." in stop.stderr
    # stop does not wait for init to reap what SIGKILL ends.
    wait_until(lambda: not alive(supervisor) and not alive(child), what="SIGKILL to take effect")
    assert not svc.pidfile.exists() and not svc.child_pidfile.exists()
    first_term = float(terms.read_text().split()[0])
    terms.write_text("")
    return first_term, stopped


def test_stop_kills_an_exporter_that_ignores_sigterm(service: Service) -> None:
    """Issue 12 rc.d 5: past kvm_exporter_stop_timeout, SIGKILL (daemon(8) would wait forever).
    Issue 20 rc.d 10: not before the timeout after the first SIGTERM. date +%s counts whole
    seconds: a deadline of "now + 1" taken from 0.3 to 0.8 s into a second comes 0.2 to 0.7 s
    later (a stop whose SIGTERMs began elsewhere in their second is tried again)."""
    svc = service
    terms = svc.root / "terms"
    terms.touch(mode=0o666)
    terms.chmod(0o666)
    command = stand_in_exporter(svc, f'exec {SYSTEM_PYTHON} -c "{TERM_LOGGER}" {terms}')
    svc.write_rc_conf(kvm_exporter_command=str(command), kvm_exporter_stop_timeout="1")
    for _attempt in range(6):
        first_term, stopped = stop_a_sigterm_deaf_exporter(svc, terms)
        if 0.3 <= first_term % 1 <= 0.8:
            break
    else:
        raise AssertionError("no stop sent its first SIGTERM 0.3 to 0.8 s into a second")
    assert stopped - first_term >= 1.0, f"SIGKILL {stopped - first_term:.2f} s after SIGTERM"


def test_a_stale_pidfile_naming_another_daemon_is_left_alone(service: Service) -> None:
    """Issue 12 rc.d 6: rc.subr's check_pidfile takes any daemon(8); status and stop do not.
    Issue 20 rc.d 8: neither do start, restart and poll (rc.subr would wait on it for ever)."""
    svc = service
    other_pidfile = svc.root / "other.pid"
    subprocess.run(
        [str(HARNESS / "daemon"), "-f", "-P", str(other_pidfile), "-t", "other_service"]
        + ["sleep", "600"],
        check=True,
    )
    other = svc.pid(other_pidfile)
    try:
        wait_until(lambda: "daemon: other_service[" in Path(f"/proc/{other}/cmdline").read_text())
        svc.run_dir.mkdir()
        svc.pidfile.write_text(f"{other}\n")
        status = svc.rc("status")
        assert (status.returncode, status.stdout) == (1, "kvm_exporter is not running.\n")
        stop = svc.rc("stop", timeout=40)
        assert (stop.returncode, stop.stderr) == (
            1,
            f"kvm_exporter not running? (check {svc.pidfile}).\n",
        )
        assert svc.rc("poll", timeout=20).returncode == 0
        assert alive(other)
        start(svc)
        assert svc.rc("stop").returncode == 0
        svc.pidfile.write_text(f"{other}\n")
        restart = svc.rc("restart")
        assert restart.returncode == 0, restart
        wait_until(svc.serving, timeout=20, what=f"/metrics after restart\n{svc.log()}")
        assert svc.pid(svc.pidfile) != other and alive(other)
    finally:
        os.kill(other, signal.SIGTERM)


def test_daemon_stand_in_drops_sigterm_during_its_restart_sleep(tmp_path: Path) -> None:
    """daemon.c: SIGTERM is watched by a kqueue that exists only while a child runs
    (daemon_eventloop); daemon_sleep ignores it. A kinder stand-in would exit at once."""
    pidfile, child_pidfile = tmp_path / "d.pid", tmp_path / "c.pid"
    subprocess.run(
        [str(HARNESS / "daemon"), "-f", "-R", "5", "-P", str(pidfile), "-p", str(child_pidfile)]
        + ["-t", "title", "sleep", "2"],
        check=True,
    )
    supervisor = int(pidfile.read_text())
    try:
        first = wait_until(lambda: pid_in(child_pidfile), what="a first child")
        cmdline = lambda: Path(f"/proc/{supervisor}/cmdline").read_text()  # noqa: E731
        wait_until(lambda: cmdline().startswith(f"daemon: title[{first}]\0"), what="the title")
        # Reaped by the supervisor, which then goes to sleep for 5 s.
        wait_until(lambda: not Path(f"/proc/{first}").exists(), what="the first child to exit")
        time.sleep(0.3)
        os.kill(supervisor, signal.SIGTERM)  # asleep: lost
        new_pid = lambda: {pid_in(child_pidfile)} - {None, first}  # noqa: E731
        (second,) = wait_until(new_pid, what="a second child")
        # /proc/PID/cmdline reads empty while the supervisor re-executes itself.
        wait_until(lambda: cmdline().startswith(f"daemon: title[{second}]\0"), what="its title")
        os.kill(supervisor, signal.SIGTERM)  # a child runs: passed on, no restart
        wait_until(lambda: not alive(supervisor), what="the supervisor to exit")
        assert not alive(second)
        assert not pidfile.exists() and not child_pidfile.exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(supervisor, signal.SIGKILL)


DUMMY = """\
#!/bin/sh
. {rc_subr}
name=dummy
rcvar=dummy_enable
command={command}
command_args={command_args}
pidfile={pidfile}
restart_precmd="echo restart_precmd; ${{DUMMY_FAIL:-true}}"
start_precmd="echo start_precmd; ${{DUMMY_START:-true}}"
stop_precmd="echo stop_precmd"
load_rc_config "${{name}}"
run_rc_command "$1"
"""


def dummy_service(tmp_path: Path, command: str, command_args: str) -> Path:
    script = tmp_path / "dummy"
    script.write_text(
        DUMMY.format(
            rc_subr=HARNESS / "rc.subr",
            command=command,
            command_args=shlex.quote(command_args),
            pidfile=tmp_path / "dummy.pid",
        )
    )
    script.chmod(0o755)
    return script


def run_dummy(script: Path, command: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(script), command],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": f"{HARNESS / 'bin'}:{SERVICE_PATH}", **env},
    )


def test_rcsubr_harness_is_as_lax_and_as_strict_as_rc_subr(tmp_path: Path) -> None:
    """rc.subr's run_rc_command, check_pidfile/_find_processes and start's eval, on a
    dummy service; each assert would fail on a kinder harness."""
    other_pidfile = tmp_path / "other.pid"
    subprocess.run(
        [str(HARNESS / "daemon"), "-f", "-P", str(other_pidfile), "-t", "other", "sleep", "600"],
        check=True,
    )
    other = int(other_pidfile.read_text())
    try:
        wait_until(lambda: "daemon: other[" in Path(f"/proc/{other}/cmdline").read_text())
        # check_pidfile: any daemon(8) is "running" for a script whose command is daemon.
        script = dummy_service(tmp_path, str(HARNESS / "daemon"), "-f sleep 600")
        (tmp_path / "dummy.pid").write_text(f"{other}\n")
        status = run_dummy(script, "onestatus")
        assert status.stdout == f"dummy is running as pid {other}.\n", status
        # restart: restart_precmd, then stop (in full, its precmd too), then start.
        restart = run_dummy(script, "onerestart", DUMMY_FAIL="false")
        assert (restart.returncode, restart.stdout) == (1, "restart_precmd\n"), restart
        assert alive(other)
        restart = run_dummy(script, "onerestart")
        assert restart.stdout.startswith(
            f"restart_precmd\nstop_precmd\nStopping dummy.\nWaiting for PIDS: {other}"
        ), restart
        assert restart.stdout.endswith(".\nstart_precmd\nStarting dummy.\n"), restart
        assert not alive(other)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(other, signal.SIGKILL)
    # start evals command_args, quotes and all.
    script = dummy_service(tmp_path, "/usr/bin/printf", "'[%s]\\n' \"a b\" 'c'")
    (tmp_path / "dummy.pid").unlink(missing_ok=True)
    start = run_dummy(script, "onestart")
    assert start.stdout == "start_precmd\nStarting dummy.\n[a b]\n[c]\n", start
    # A failing start_precmd stops start, but not forcestart.
    refused = run_dummy(script, "onestart", DUMMY_START="false")
    assert (refused.returncode, refused.stdout) == (1, "start_precmd\n"), refused
    assert "failed precmd routine for dummy" in refused.stderr
    forced = run_dummy(script, "forcestart", DUMMY_START="false")
    assert forced.stdout == "start_precmd\nStarting dummy.\n[a b]\n[c]\n", forced


def su_stand_in(command: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``su -m nobody -c COMMAND`` through tests/rcsubr/bin/su."""
    return subprocess.run(
        [str(HARNESS / "bin" / "su"), "-m", "nobody", "-c", command],
        capture_output=True,
        text=True,
        env={"PATH": SERVICE_PATH, "HOME": "/", **env},
        timeout=30,
    )


def test_su_stand_in_runs_csh_as_freebsds_su_does() -> None:
    """su.c names a csh or tcsh "_su" and passes it -m; csh takes a quoted "!" for history."""
    result = su_stand_in("echo $0; id -u", RCSUBR_LOGIN_SHELL="/bin/tcsh")
    assert (result.returncode, result.stdout) == (0, f"_su\n{NOBODY}\n"), result
    result = su_stand_in("echo 'a!b'", RCSUBR_LOGIN_SHELL="/bin/tcsh")
    assert (result.returncode, result.stdout, result.stderr) == (1, "", "b: Event not found.\n")


def test_su_stand_in_runs_the_callers_shell_as_the_user() -> None:
    """FreeBSD su -m: the caller's login shell, the target's ids; nobody's nologin unused."""
    result = su_stand_in("id -u; id -G")
    assert (result.returncode, result.stdout) == (0, f"{NOBODY}\n{NOBODY}\n"), result
