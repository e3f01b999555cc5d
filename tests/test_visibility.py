"""kvm_process_visibility_restricted: kernel restrictions that hide processes from the exporter.

Linux: a real procfs mounted in a private mount namespace (``unshare --mount``), with and
without ``hidepid``, read by the exporter as an unprivileged uid; and a PID namespace of its
own (``unshare --pid --mount-proc``). FreeBSD: the fake libkvm's sysctls, each reason
restricted and not, read by the exporter as an unprivileged uid (and as root, whom
priv_check_cred() exempts). Each kernel fact is cited where a test relies on it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from attack_support import import_path, world_dir
from conftest import SYSTEM_PYTHON, free_port, listens, samples, wait_until
from fakelib import SCENARIOS, build_fake_libkvm

from kvm_exporter import visibility
from kvm_exporter.sources.procfs import ProcfsSource

READER = 61234
"""The uid and gid the exporter runs as: no account, no capability."""
GROUP = 61235
"""A group the reader is put in where a test says so."""
METRIC = "kvm_process_visibility_restricted"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def once(
    prefix: list[str],
    *args: str,
    reader: bool = True,
    groups: int | None = None,
    env: dict[str, str] | None = None,
    caps: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """``kvm_exporter --once`` run by ``prefix``, as :data:`READER` (in ``groups`` too, with
    the setpriv capability options ``caps``) or, without ``reader``, as root."""
    become = ["setpriv", f"--reuid={READER}", f"--regid={READER}", *caps]
    become.append(f"--groups={groups}" if groups is not None else "--clear-groups")
    return subprocess.run(
        [*prefix, *(become if reader else []), SYSTEM_PYTHON, "-m", "kvm_exporter", "--once"]
        + list(args),
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        env={**os.environ, "PYTHONPATH": import_path(), **(env or {})},
    )


def in_proc_mount(options: str) -> list[str]:
    """Run what follows with a fresh procfs mounted over /proc with ``options``, in a mount
    namespace of its own: the host's /proc is untouched (Linux 5.8+ gives every procfs
    mount its own options, ``fs/proc/root.c`` proc_get_tree: one superblock per mount)."""
    mount = f"mount -t proc -o {options} proc /proc" if options else "mount -t proc proc /proc"
    return ["unshare", "--mount", "--fork", "--", "sh", "-c", f'{mount} && exec "$@"', "sh"]


def restricted(metrics: Samples) -> dict[str, float]:
    return {dict(labels)["reason"]: v for (name, labels), v in metrics.items() if name == METRIC}


def processes(metrics: Samples) -> float:
    return sum(v for (name, _), v in metrics.items() if name == "kvm_processes")


@pytest.mark.parametrize(
    ("options", "groups", "hidden"),
    [
        ("hidepid=invisible", None, True),
        ("hidepid=2", None, True),  # Linux before 5.8 spells it as a number
        ("hidepid=invisible,gid=61235", GROUP, False),  # the gid= group is exempt
        ("hidepid=invisible,gid=61235", None, True),  # ... and only that group
        # ptraceable ignores gid=: has_pid_permissions() asks ptrace_may_access() alone.
        ("hidepid=ptraceable,gid=61235", GROUP, True),
        ("", None, False),
    ],
)
def test_hidepid_is_reported_where_it_hides_processes(
    options: str, groups: int | None, hidden: bool
) -> None:
    """As uid 61234, a /proc with hidepid shows next to nothing (its own process) while
    every read succeeds: kvm_up stays 1, and only the new gauge tells. With no hidepid, or
    in the mount's gid= group, the same reader sees the host's processes and the gauge says
    0. The warning names the remedy."""
    host = len(ProcfsSource().procs())
    result = once(in_proc_mount(options), groups=groups)
    assert result.returncode == 0, result.stderr
    metrics = samples(result.stdout)
    assert metrics[("kvm_up", frozenset())] == 1
    assert restricted(metrics) == {"hidepid": hidden, "pid_namespace": 0}
    seen = processes(metrics)
    if hidden:
        assert seen <= 2 < host / 2, (seen, host)
        assert "hidepid: mount /proc with gid=GROUP" in result.stderr
        assert result.stderr.count("level=warn") == 1, result.stderr
    else:
        assert seen > host / 2, (seen, host)
        assert "level=warn" not in result.stderr, result.stderr


def test_a_reader_with_cap_sys_ptrace_sees_through_hidepid() -> None:
    """ptrace_may_access() lets a reader with CAP_SYS_PTRACE read any process
    (``kernel/ptrace.c`` __ptrace_may_access: ptrace_has_cap), so hidepid does not restrict
    it, whatever its uid and groups."""
    host = len(ProcfsSource().procs())
    ptrace = ("--inh-caps=+sys_ptrace", "--ambient-caps=+sys_ptrace")
    result = once(in_proc_mount("hidepid=invisible"), caps=ptrace)
    assert result.returncode == 0, result.stderr
    metrics = samples(result.stdout)
    assert restricted(metrics) == {"hidepid": 0, "pid_namespace": 0}
    assert processes(metrics) > host / 2, (processes(metrics), host)


@pytest.mark.parametrize("own_proc", [True, False])
def test_a_pid_namespace_is_reported_where_its_proc_is_read(own_proc: bool) -> None:
    """In a PID namespace with its own /proc (``--mount-proc``) the exporter sees that
    namespace's processes alone (``fs/proc/base.c`` proc_pid_readdir lists the mount's
    namespace): pid_namespace 1. In one that still reads the host's /proc, its ``NSpid``
    has two entries (``fs/proc/array.c`` task_state: one per namespace from the mount's
    down) and it sees the host's processes: 0. Outside any, 0 (the hidepid tests)."""
    host = len(ProcfsSource().procs())
    prefix = ["unshare", "--pid", "--fork", *(["--mount-proc"] if own_proc else []), "--"]
    result = once(prefix)
    assert result.returncode == 0, result.stderr
    metrics = samples(result.stdout)
    assert restricted(metrics) == {"hidepid": 0, "pid_namespace": own_proc}
    if own_proc:
        assert processes(metrics) <= 2
        assert "pid_namespace: run the exporter in the host's PID namespace" in result.stderr
    else:
        assert processes(metrics) > host / 2, (processes(metrics), host)
        assert "level=warn" not in result.stderr, result.stderr


def test_a_proc_with_only_the_process_directories_is_named_as_such() -> None:
    """``subset=pid`` (systemd ProcSubset=pid; ``fs/proc/root.c`` proc_parse_subset_param)
    leaves loadavg and the rest out: the start fails with a message naming the option."""
    result = once(in_proc_mount("subset=pid"))
    assert result.returncode == 1
    assert "/proc is mounted with subset=pid (systemd ProcSubset=pid)" in result.stderr


def test_a_reload_checks_again() -> None:
    """A running exporter (as the reader, in a mount namespace of its own) sees /proc
    remounted with hidepid=invisible on the next SIGHUP."""
    port = free_port()
    become = ["setpriv", f"--reuid={READER}", f"--regid={READER}", "--clear-groups", "--"]
    exporter = [SYSTEM_PYTHON, "-m", "kvm_exporter", f"--web.listen-address=127.0.0.1:{port}"]
    proc = subprocess.Popen(
        [*in_proc_mount(""), *become, *exporter],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
        env={**os.environ, "PYTHONPATH": import_path()},
    )
    # unshare --fork waits for its one child: the shell that became the exporter.
    child = wait_until(
        lambda: Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split(),
        what="unshare's child",
    )
    child = int(child[0])
    try:
        url = f"http://127.0.0.1:{port}/metrics"

        def hidden() -> dict[str, float] | None:
            if not listens(child, port):
                return None
            with urllib.request.urlopen(url, timeout=10) as response:
                return restricted(samples(response.read().decode()))

        assert wait_until(hidden, timeout=30, what="the exporter") == {
            "hidepid": 0,
            "pid_namespace": 0,
        }
        remount = ["nsenter", f"--mount=/proc/{child}/ns/mnt", "--"]
        subprocess.run([*remount, "mount", "-o", "remount,hidepid=invisible", "/proc"], check=True)
        os.kill(child, signal.SIGHUP)
        wait_until(lambda: (hidden() or {}).get("hidepid") == 1, what="hidepid after SIGHUP")
    finally:
        os.kill(child, signal.SIGTERM)  # unshare waits for it and exits with it
        _, stderr = proc.communicate(timeout=15)
    assert stderr.count("hidepid: mount /proc with gid=GROUP") == 1, stderr


def test_unreadable_mountinfo_leaves_hidepid_out_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    missing = tmp_path / "mountinfo"
    assert visibility.procfs("/proc", str(missing)) == {}
    assert f"cannot tell whether /proc hides processes: {missing}" in caplog.text


def test_mountinfo_finds_the_mount_on_top_and_unescapes_paths() -> None:
    """The last of two mounts on one point is on top; ``\\040`` is a space in a path."""
    text = (
        "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
        "40 22 0:44 / /proc rw - proc proc rw,hidepid=invisible,gid=7\n"
        "41 1 0:45 / /srv/with\\040space rw shared:9 - tmpfs tmpfs rw,size=4k\n"
    )
    assert visibility.mount_of("/proc", text) == (
        "/proc",
        "proc",
        {"rw": "", "hidepid": "invisible", "gid": "7"},
    )
    assert visibility.mount_of("/srv/with space/x", text) == (
        "/srv/with space",
        "tmpfs",
        {"rw": "", "size": "4k"},
    )
    assert visibility.mount_of("/srv", text) is None


# ------------------------------------------------------------------------ FreeBSD (fake)

DEFAULTS = {
    "security.jail.jailed": 0,
    "security.bsd.suser_enabled": 1,
    "security.bsd.see_other_uids": 1,
    "security.bsd.see_other_gids": 1,
    "security.bsd.see_jail_proc": 1,
}
"""A FreeBSD kernel's defaults (``kern_prot.c``: ``static int see_other_uids = 1``, and so
for see_other_gids and see_jail_proc; ``kern_priv.c``: suser_enabled 1)."""
CLEAR = {"jail": 0, "see_other_uids": 0, "see_other_gids": 0, "see_jail_proc": 0}
CLEAR_ALL = {**CLEAR, "mac_seeotheruids": 0}


@pytest.fixture(scope="module")
def freebsd_world() -> Iterator[Path]:
    """A directory every user can read, with the fake libkvm built into it."""
    with world_dir() as path:
        build_fake_libkvm(path).chmod(0o755)
        yield path


MAC = {
    "security.mac.seeotheruids.enabled": 1,
    "security.mac.seeotheruids.suser_privileged": 1,
    "security.mac.seeotheruids.specificgid_enabled": 0,
    "security.mac.seeotheruids.specificgid": 0,
}
"""mac_seeotheruids(4) loaded: its sysctls and their defaults (``mac_seeotheruids.c``)."""
EXEMPT = {
    **MAC,
    "security.mac.seeotheruids.specificgid_enabled": 1,
    "security.mac.seeotheruids.specificgid": GROUP,
}
"""mac_seeotheruids(4) with the group the README tells to exempt."""
OTHER_GROUP = 61236
"""A group the reader is never in."""


def freebsd_once(
    world: Path,
    sysctls: dict[str, int | str | None],
    reader: bool = True,
    groups: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """--once on the fake with web01's processes and :data:`DEFAULTS` changed by ``sysctls``
    (None: the kernel has no such node; a str: a string node)."""
    values = {**DEFAULTS, **sysctls}
    lines = [
        f"sysctl_text {name} {value}" if isinstance(value, str) else f"sysctl {name} {value}"
        for name, value in values.items()
        if value is not None
    ]
    web01 = (SCENARIOS / "web01.scenario").read_text().splitlines()
    lines += [line for line in web01 if not line.startswith("sysctl security.")]
    scenario = world / "host.scenario"
    scenario.write_text("\n".join(lines) + "\n")
    scenario.chmod(0o644)
    config = world / "kvm_exporter.yml"
    config.write_text(f"source: libkvm\nlibkvm:\n  library: {world / 'libfakekvm.so'}\n")
    config.chmod(0o644)
    env = {"FAKE_KVM_SCENARIO": str(scenario)}
    return once([], f"--config.file={config}", reader=reader, groups=groups, env=env)


@pytest.mark.parametrize(
    ("sysctls", "reader", "groups", "found"),
    [
        ({}, True, None, CLEAR_ALL),
        # kern_prot.c cr_canseeotheruids(): other real uids hidden unless privileged.
        ({"security.bsd.see_other_uids": 0}, True, None, {**CLEAR_ALL, "see_other_uids": 1}),
        # cr_canseeothergids(): processes sharing none of the reader's groups hidden.
        ({"security.bsd.see_other_gids": 0}, True, None, {**CLEAR_ALL, "see_other_gids": 1}),
        # cr_canseejailproc(): processes of other jails hidden.
        ({"security.bsd.see_jail_proc": 0}, True, None, {**CLEAR_ALL, "see_jail_proc": 1}),
        # kern_jail.c prison_check(): a jailed reader sees its jail and those below only.
        ({"security.jail.jailed": 1}, True, None, {**CLEAR_ALL, "jail": 1}),
        # mac_seeotheruids.c seeotheruids_check(): other real uids hidden ...
        (MAC, True, None, {**CLEAR_ALL, "mac_seeotheruids": 1}),
        # ... but from a reader in specificgid's group, with specificgid_enabled.
        (EXEMPT, True, GROUP, CLEAR_ALL),
        (EXEMPT, True, None, {**CLEAR_ALL, "mac_seeotheruids": 1}),
        # Root: priv_check_cred() grants PRIV_SEEOTHERUIDS/GIDS and PRIV_SEEJAILPROC
        # (kern_priv.c, uid 0 while suser_enabled), and suser_privileged exempts from MAC.
        (
            {
                "security.bsd.see_other_uids": 0,
                "security.bsd.see_other_gids": 0,
                "security.bsd.see_jail_proc": 0,
                **MAC,
            },
            False,
            None,
            CLEAR_ALL,
        ),
        # Jailed root: kern_jail.c prison_priv_check() grants PRIV_SEEOTHERUIDS, not
        # PRIV_SEEJAILPROC.
        (
            {
                "security.jail.jailed": 1,
                "security.bsd.see_other_uids": 0,
                "security.bsd.see_jail_proc": 0,
            },
            False,
            None,
            {**CLEAR_ALL, "jail": 1, "see_jail_proc": 1},
        ),
        (
            {"security.bsd.see_other_uids": 0, "security.bsd.suser_enabled": 0},
            False,
            None,
            {**CLEAR_ALL, "see_other_uids": 1},
        ),
    ],
)
def test_freebsd_restrictions_from_the_sysctls(
    freebsd_world: Path,
    sysctls: dict[str, int | str | None],
    reader: bool,
    groups: int | None,
    found: dict[str, int],
) -> None:
    """Each reason 1 where its sysctl restricts this reader, 0 where it does not; one
    warning names each reason that applies and its remedy."""
    result = freebsd_once(freebsd_world, sysctls, reader, groups)
    assert result.returncode == 0, result.stderr
    metrics = samples(result.stdout)
    assert restricted(metrics) == found
    assert metrics[("kvm_up", frozenset())] == 1
    applying = [reason for reason, applies in found.items() if applies]
    warnings = [line for line in result.stderr.splitlines() if "level=warn" in line]
    if applying:
        assert len(warnings) == 1, result.stderr
        for reason in applying:
            assert f"{reason}: {visibility.REMEDIES[reason]}" in warnings[0]
    else:
        assert not [w for w in warnings if "hides processes" in w], result.stderr


def test_a_sysctl_an_old_kernel_lacks_leaves_its_reason_out(freebsd_world: Path) -> None:
    """On a kernel without security.bsd.see_jail_proc (sysctlbyname: ENOENT) the
    reason is left out, not reported as 0, and the log says why."""
    result = freebsd_once(freebsd_world, {"security.bsd.see_jail_proc": None})
    assert result.returncode == 0, result.stderr
    found = restricted(samples(result.stdout))
    assert found == {k: v for k, v in CLEAR_ALL.items() if k != "see_jail_proc"}
    assert (
        "sysctl security.bsd.see_jail_proc does not exist on this kernel: see_jail_proc not"
        " checked" in result.stderr
    )


@pytest.mark.parametrize(
    ("listed", "restricts"),
    [
        (f"{OTHER_GROUP},{GROUP}", 0),  # the reader's group second in the list
        (f"{OTHER_GROUP} {GROUP}", 0),
        (f"{GROUP}", 0),
        (f"{OTHER_GROUP},{OTHER_GROUP + 1}", 1),
    ],
)
def test_a_specificgid_list_exempts_a_reader_in_any_of_its_groups(
    freebsd_world: Path, listed: str, restricts: int
) -> None:
    """Where security.mac.seeotheruids.specificgid is a string node listing gids (its kind,
    sysctl.oidfmt, says CTLTYPE_STRING; mac_seeotheruids(4) on FreeBSD main: "the list of
    group IDs to be exempted"), the reader is exempt when in any of them, not only the
    first; seeotheruids_check() tests groupmember() of each exempted gid."""
    sysctls = {**EXEMPT, "security.mac.seeotheruids.specificgid": listed}
    result = freebsd_once(freebsd_world, sysctls, groups=GROUP)
    assert result.returncode == 0, result.stderr
    assert restricted(samples(result.stdout)) == {**CLEAR_ALL, "mac_seeotheruids": restricts}
    assert "cannot tell" not in result.stderr


def test_a_specificgid_text_that_lists_no_gids_leaves_the_reason_out(freebsd_world: Path) -> None:
    """A string node that is not a list of decimal gids is refused, not guessed at: the
    reason is left out and the log quotes the text."""
    sysctls = {**EXEMPT, "security.mac.seeotheruids.specificgid": f"{GROUP},procview"}
    result = freebsd_once(freebsd_world, sysctls, groups=GROUP)
    assert result.returncode == 0, result.stderr
    assert restricted(samples(result.stdout)) == CLEAR
    assert (
        "sysctl security.mac.seeotheruids.specificgid: '61235,procview' is not a list of ids"
        in result.stderr
    )
