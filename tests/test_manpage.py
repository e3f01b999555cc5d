"""The manual page packaging/kvm_exporter.8: mdoc that mandoc accepts, and in step with
``kvm_exporter --help`` and the rc.d script.

Its paths under the install prefix are written ``%%PREFIX%%/...``, as in the port's rc.d
script (packaging/freebsd/files/kvm_exporter.in): the port substitutes its PREFIX, any other
build /usr/local (setup.py); test_packaging checks both."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAN = REPO / "packaging" / "kvm_exporter.8"
RC_D = REPO / "rc.d" / "kvm_exporter"
RC_IN = REPO / "packaging" / "freebsd" / "files" / "kvm_exporter.in"

NOT_ON_LINUX = ("referenced manual not found", "outdated mandoc.db")
"""mandoc's notes that only say this Linux machine lacks FreeBSD's manuals (kvm(3), ...)."""

SECTIONS = ("NAME", "SYNOPSIS", "DESCRIPTION", "RC.CONF VARIABLES", "FILES", "EXIT STATUS")
SEE_ALSO = (
    "kvm 3",
    "kvm_getprocs 3",
    "syslog 3",
    "mac_seeotheruids 4",
    "rc.conf 5",
    "syslog.conf 5",
    "daemon 8",
    "jail 8",
    "rc.subr 8",
)


def man_text() -> str:
    return MAN.read_text()


def section(name: str) -> str:
    """The source lines of one ``.Sh`` section."""
    match = re.search(rf"^\.Sh {re.escape(name)}\n(.*?)(?=^\.Sh |\Z)", man_text(), re.M | re.S)
    assert match, f"no .Sh {name} section"
    return match.group(1)


def mandoc_lint(page: Path) -> list[str]:
    """mandoc's lint messages on ``page`` down to style, less the NOT_ON_LINUX notes."""
    result = subprocess.run(
        ["mandoc", "-T", "lint", "-W", "style", str(page)], capture_output=True, text=True
    )
    return [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if not any(note in line for note in NOT_ON_LINUX)
    ]


def test_mandoc_lint_is_clean_down_to_style() -> None:
    assert mandoc_lint(MAN) == []


def test_mandoc_rejects_a_broken_page(tmp_path: Path) -> None:
    # The lint above is only worth something if mandoc reports what it should.
    broken = tmp_path / "broken.8"
    broken.write_text(man_text().replace(".Sh SYNOPSIS\n", ".Sh SYNOPSIS\n.Bl -tag\n", 1))
    result = subprocess.run(
        ["mandoc", "-T", "lint", "-W", "warning", str(broken)], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "WARNING" in result.stdout + result.stderr


def test_page_has_freebsd_sections_and_references() -> None:
    text = man_text()
    assert text.startswith('.\\"') and "\n.Dd " in text and "\n.Dt KVM_EXPORTER 8\n" in text
    for name in SECTIONS:
        section(name)
    see_also = set(re.findall(r"^\.Xr (\S+ \d)", section("SEE ALSO"), re.M))
    assert set(SEE_ALSO) <= see_also
    before_see_also = text.split("\n.Sh SEE ALSO\n")[0]
    cited = set(re.findall(r"^\.Xr (\S+ \d)", before_see_also, re.M))
    assert cited - see_also == set(), "pages the text refers to that SEE ALSO does not list"


def test_paths_under_the_prefix_are_left_to_the_build() -> None:
    text = man_text()
    assert "/usr/local" not in text
    assert set(re.findall(r"%%(\w+)%%", text)) == {"PREFIX"}
    files = section("FILES")
    for path in ("etc/kvm_exporter.yml", "etc/kvm_exporter.yml.sample", "etc/rc.d/kvm_exporter"):
        assert f"\n.It Pa %%PREFIX%%/{path}\n" in files


def test_page_says_where_daemon_sends_the_log_lines() -> None:
    # daemon(8) logs each line of the child's output with syslog(3) at its defaults,
    # facility LOG_DAEMON and priority LOG_NOTICE (freebsd-src usr.sbin/daemon/daemon.c:
    # main()'s log_params at 0049f48b, daemon_state_init() since), unless -l or -s is given;
    # -T sets the tag. The default syslog.conf (usr.sbin/syslogd/syslog.conf at 1b1334b1) has
    # "*.notice;...  /var/log/messages" and "daemon.info  /var/log/daemon.log".
    daemon_args = re.search(r'^command_args="([^"]*)"', RC_D.read_text(), re.M)
    assert daemon_args, "no command_args for daemon(8) in the rc.d script"
    flags = set(re.findall(r"(?<!\S)(-[A-Za-z])(?!\S)", daemon_args.group(1)))
    assert "-T" in flags and not flags & {"-l", "-s"}
    text = man_text()
    for words in ("facility\n.Dq daemon", "priority\n.Dq notice", "/var/log/messages"):
        assert words in text
    assert ".Pa /var/log/daemon.log" in text


def test_every_flag_of_help_is_documented() -> None:
    helped = subprocess.run(
        [sys.executable, "-m", "kvm_exporter", "--help"],
        capture_output=True,
        text=True,
        cwd="/",
        check=True,
    ).stdout
    flags = set(re.findall(r"(?<![\w-])--([a-z][a-z0-9.-]*)", helped))
    assert {"config.file", "web.listen-address", "help"} <= flags
    described = set(re.findall(r"^\.It Fl .*?-(\S+?)(?: Ns|$)", section("DESCRIPTION"), re.M))
    described |= set(re.findall(r"^\.It Fl h , Fl -(\S+)$", section("DESCRIPTION"), re.M))
    synopsis = section("SYNOPSIS")
    assert flags - described == set(), "flags of --help missing from the option list"
    assert {f for f in flags - {"help"} if f"Fl -{f}" not in synopsis} == set()


RC_DEFAULT = re.compile(r'^: "?\$\{(kvm_exporter_\w+):?="?([^"}]*)"?\}"?$', re.M)
"""``: ${name:=value}`` or ``: ${name="value"}`` (the Porter's Handbook's form)."""
RC_DOCUMENTED = re.compile(r"^# (kvm_exporter_\w+) \(\w+\):", re.M)
"""The rc.conf variables the script's header lists."""


def rc_variables(script: str) -> dict[str, str | None]:
    """Every rc.conf variable of ``script`` with its default (None: none assigned)."""
    defaults = dict(RC_DEFAULT.findall(script))
    return {name: defaults.get(name) for name in RC_DOCUMENTED.findall(script)} | defaults


def test_rc_variables_are_read_in_either_default_style() -> None:
    quoted = '# kvm_exporter_a (str): x\n: ${kvm_exporter_a="/usr/x"}\n: ${kvm_exporter_b=""}\n'
    colon = '# kvm_exporter_c (bool): y\n: "${kvm_exporter_c:=NO}"\n# kvm_exporter_d (str): unset\n'
    assert rc_variables(quoted) == {"kvm_exporter_a": "/usr/x", "kvm_exporter_b": ""}
    assert rc_variables(colon) == {"kvm_exporter_c": "NO", "kvm_exporter_d": None}


def test_every_rc_conf_variable_is_documented_with_its_default() -> None:
    # The port's copy of the script: its defaults are %%PREFIX%%/..., as in the manual.
    variables = rc_variables(RC_IN.read_text())
    assert "kvm_exporter_enable" in variables
    documented = section("RC.CONF VARIABLES")
    for name, default in variables.items():
        entry = re.search(rf"^\.It Va {name}\n(.*?)(?=^\.It |^\.El)", documented, re.M | re.S)
        assert entry, f"{name} is not in RC.CONF VARIABLES"
        if default:
            assert default in entry.group(1), f"{name}: default {default} not given"
        elif default == "":
            assert "Default: empty." in entry.group(1)
