"""Which kernel restrictions hide processes from the exporter.

A hardened host hides other users' processes from an unprivileged reader without an error:
every read succeeds, ``kvm_up`` is 1, and the counts are short. Each check here names one
such restriction and says whether it applies to this exporter (True), does not (False), or
could not be told (left out, with a warning saying why). A check runs at start and on reload.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping

from .records import Source, SourceError

log = logging.getLogger(__name__)

Visibility = Mapping[str, bool]
"""Restriction (the ``reason`` label) -> whether it hides processes from the exporter."""

REMEDIES: dict[str, str] = {
    "hidepid": "mount /proc with gid=GROUP and add the exporter to GROUP"
    " (systemd SupplementaryGroups=GROUP)",
    "pid_namespace": "run the exporter in the host's PID namespace",
    "see_other_uids": "set security.bsd.see_other_uids=1 and hide other users' processes with"
    " mac_seeotheruids(4) instead, security.mac.seeotheruids.specificgid the exporter's group",
    "see_other_gids": "set security.bsd.see_other_gids=1 and hide other users' processes with"
    " mac_seeotheruids(4) instead, security.mac.seeotheruids.specificgid the exporter's group",
    "see_jail_proc": "set security.bsd.see_jail_proc=1",
    "mac_seeotheruids": "set security.mac.seeotheruids.specificgid_enabled=1 and"
    " security.mac.seeotheruids.specificgid to a group of the exporter's user",
    "jail": "run the exporter on the host, outside any jail",
}
"""What lifts each restriction for the exporter alone, without running it as root."""

_HIDEPID_NAMES = {"0": "off", "1": "noaccess", "2": "invisible", "4": "ptraceable"}
"""hidepid= as Linux before 5.8 printed it (a number), by the name it prints since."""
CAP_SYS_PTRACE = 19
PROC_PID_INIT_INO = 0xEFFFFFFC
"""The inode of the initial PID namespace (``include/linux/proc_ns.h``), fixed since 3.8."""
_OCTAL = re.compile(r"\\([0-3][0-7]{2})")


def check(source: Source) -> Visibility:
    """The restrictions on ``source``, the ones that apply logged in one warning."""
    found = source.visibility()
    report(found)
    return found


def report(found: Visibility) -> None:
    """Log one warning naming the restrictions that apply and what lifts each."""
    applying = [reason for reason, applies in sorted(found.items()) if applies]
    if applying:
        log.warning(
            "the kernel hides processes from this exporter, so its counts are short"
            " (kvm_process_visibility_restricted): %s",
            "; ".join(f"{reason}: {REMEDIES[reason]}" for reason in applying),
        )


def _unescape(field: str) -> str:
    """A path of mountinfo, whose space, tab, newline and backslash are octal escapes."""
    return _OCTAL.sub(lambda m: chr(int(m[1], 8)), field)


def mount_of(path: str, mountinfo: str) -> tuple[str, str, dict[str, str]] | None:
    """(mount point, file system type, super options) of the mount that holds ``path``
    (absolute, resolved), from the text of ``/proc/self/mountinfo``; the last mount on a
    point is the one on top."""
    found: tuple[str, str, dict[str, str]] | None = None
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if "-" not in fields[6:]:
            continue
        after = fields.index("-", 6)
        point = _unescape(fields[4])
        if os.path.commonpath((point, path)) != point:
            continue
        if found is None or len(point) >= len(found[0]):
            options = dict((o.split("=", 1) + [""])[:2] for o in fields[after + 3].split(",") if o)
            found = (point, fields[after + 1], options)
    return found


def _capabilities(status: str) -> int:
    """The effective capability set of a ``/proc/PID/status`` text."""
    line = next(line for line in status.splitlines() if line.startswith("CapEff:"))
    return int(line.split()[1], 16)


def _proc_mount(root: str, mountinfo: str) -> dict[str, str] | None:
    """The options of the procfs mounted at or above ``root``; None if that mount is not a
    procfs. Raises OSError, ValueError or IndexError for a mountinfo that cannot be read."""
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as file:
        mount = mount_of(os.path.realpath(root), file.read())
    return mount[2] if mount is not None and mount[1] == "proc" else None


def procfs_subset(root: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The ``subset=`` option of the procfs at ``root`` (``pid``: ``fs/proc/root.c``
    proc_parse_subset_param, which hides every entry but the process directories); None
    without one, or where the mounts cannot be read."""
    try:
        options = _proc_mount(root, mountinfo)
    except (OSError, ValueError, IndexError):
        return None
    return None if options is None else options.get("subset")


def procfs(root: str, mountinfo: str = "/proc/self/mountinfo") -> dict[str, bool]:
    """The restrictions of the procfs at ``root``: ``hidepid`` and ``pid_namespace``.

    ``fs/proc/base.c`` has_pid_permissions(): under hidepid noaccess or invisible, a process
    is shown to a reader in the mount's ``gid=`` group (0, root's, when not given) or one
    ptrace_may_access() lets read it (same uid, or CAP_SYS_PTRACE); under ptraceable only
    to the latter. A procfs lists the processes of the PID namespace it was mounted in
    (proc_pid_readdir walks ``proc_pid_ns(sb)``).
    """
    try:
        options = _proc_mount(root, mountinfo)
    except (OSError, ValueError, IndexError) as err:
        log.warning("cannot tell whether %s hides processes: %s: %s", root, mountinfo, err)
        return {}
    if options is None:
        log.info("%s is not a procfs mount: process visibility not checked", root)
        return {}
    found: dict[str, bool] = {}
    try:
        with open(os.path.join(root, "self/status"), encoding="ascii", errors="replace") as f:
            status = f.read()
        ptrace = bool(_capabilities(status) >> CAP_SYS_PTRACE & 1)
        hidepid = options.get("hidepid", "off")
        hidepid = _HIDEPID_NAMES.get(hidepid, hidepid)
        in_group = int(options.get("gid", "0")) in (os.getegid(), *os.getgroups())
        found["hidepid"] = (
            hidepid != "off" and not ptrace and (hidepid == "ptraceable" or not in_group)
        )
        found["pid_namespace"] = _other_namespace(root, status)
    except (OSError, ValueError, StopIteration) as err:
        log.warning("cannot tell whether %s hides processes: %s", root, err)
    return found


def _other_namespace(root: str, status: str) -> bool:
    """Whether the procfs at ``root`` lists only a PID namespace other than the initial one:
    the exporter's own namespace is not the initial one, and its ``NSpid`` (its pid in each
    namespace from the mount's down to its own, ``fs/proc/array.c`` task_state) has one."""
    if os.stat(os.path.join(root, "self/ns/pid")).st_ino == PROC_PID_INIT_INO:
        return False
    line = next(line for line in status.splitlines() if line.startswith("NSpid:"))
    return len(line.split()) == 2


Sysctl = Callable[[str], int | None]
"""Reads one int sysctl by name; None where the kernel has no such node."""
SysctlIds = Callable[[str], tuple[int, ...] | None]
"""Reads a sysctl that lists ids (one or several) by name; None where there is no such node."""


def freebsd(sysctl: Sysctl, ids: SysctlIds) -> dict[str, bool]:
    """The restrictions FreeBSD's sysctls set, ``sysctl`` and ``ids`` reading them.

    ``sys/kern/kern_prot.c`` cr_cansee(), which kern.proc's sysctl_kern_proc applies to
    each process: prison_check() (a jailed reader sees its jail and those below), the MAC
    policies' cred_check_visible, then cr_canseeotheruids(), cr_canseeothergids() and
    cr_canseejailproc(), each lifted by priv_check_cred(), which grants root
    (``kern_priv.c``: uid 0 while security.bsd.suser_enabled; ``kern_jail.c``
    prison_priv_check() grants PRIV_SEEOTHERUIDS and PRIV_SEEOTHERGIDS to jailed root, not
    PRIV_SEEJAILPROC).
    """
    found: dict[str, bool] = {}
    try:
        jailed = _known(sysctl, "security.jail.jailed", "jail")
        if jailed is not None:
            found["jail"] = jailed != 0
        root = os.geteuid() == 0 and sysctl("security.bsd.suser_enabled") != 0
        for reason in ("see_other_uids", "see_other_gids", "see_jail_proc"):
            value = _known(sysctl, f"security.bsd.{reason}", reason)
            # prison_priv_check() does not grant jailed root PRIV_SEEJAILPROC.
            exempt = root and not (reason == "see_jail_proc" and jailed)
            if value is not None:
                found[reason] = value == 0 and not exempt
        enabled = sysctl("security.mac.seeotheruids.enabled")  # None: the module is not loaded
        found["mac_seeotheruids"] = bool(enabled) and not _seeotheruids_exempt(sysctl, ids, root)
    except SourceError as err:
        log.warning("cannot tell every restriction on process visibility: %s", err)
    return found


def _known(sysctl: Sysctl, name: str, reason: str) -> int | None:
    """Sysctl ``name``, or None with a warning that ``reason`` is left out: a node every
    kernel of this exporter's era has, so its absence is worth saying."""
    value = sysctl(name)
    if value is None:
        log.warning("sysctl %s does not exist on this kernel: %s not checked", name, reason)
    return value


def _seeotheruids_exempt(sysctl: Sysctl, ids: SysctlIds, root: bool) -> bool:
    """``sys/security/mac_seeotheruids/mac_seeotheruids.c`` seeotheruids_check(): root
    while suser_privileged, and with specificgid_enabled a reader whose real gid or one of
    whose groups is specificgid: any of its gids where the kernel takes a list."""
    if root and sysctl("security.mac.seeotheruids.suser_privileged") != 0:
        return True
    if not sysctl("security.mac.seeotheruids.specificgid_enabled"):
        return False
    exempted = ids("security.mac.seeotheruids.specificgid") or ()
    return not {os.getgid(), *os.getgroups()}.isdisjoint(exempted)
