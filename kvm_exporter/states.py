"""One process-state vocabulary for FreeBSD and Linux, and the mapping from each.

The words are part of the metric contract (label ``state`` of ``kvm_processes``);
README.md documents the same tables.
"""

from __future__ import annotations

STATES: tuple[str, ...] = (
    "running",
    "sleeping",
    "idle",
    "uninterruptible",
    "lock",
    "waiting",
    "stopped",
    "traced",
    "zombie",
    "dead",
    "new",
    "parked",
    "unknown",
)

# /proc/PID/stat field 3, every letter of proc(5) across kernel versions.
LINUX_STATES: dict[str, str] = {
    "R": "running",
    "S": "sleeping",
    "D": "uninterruptible",
    "Z": "zombie",
    "T": "stopped",
    "t": "traced",
    "X": "dead",
    "x": "dead",
    "K": "uninterruptible",  # wakekill (2.6.33-3.13): a killable uninterruptible sleep
    "W": "running",  # waking (2.6.33-3.13); paging before 2.6.0
    "P": "parked",  # parked kernel thread (3.9-3.13)
    "I": "idle",  # idle kernel thread (4.14+)
}

# FreeBSD ki_stat values, sys/sys/proc.h.
SIDL, SRUN, SSLEEP, SSTOP, SZOMB, SWAIT, SLOCK = 1, 2, 3, 4, 5, 6, 7
TDF_SINTR = 0x00000008
MAXSLP = 20
"""Seconds of sleep after which FreeBSD's ps calls an interruptible sleeper idle (``I``)."""

_FREEBSD_STATES: dict[int, str] = {
    SIDL: "new",
    SRUN: "running",
    SSTOP: "stopped",
    SZOMB: "zombie",
    SWAIT: "waiting",
    SLOCK: "lock",
}


DUMP_STATES: tuple[str, ...] = tuple(
    state for state in STATES if state not in ("idle", "uninterruptible")
)
"""The states a crash dump can tell apart: without ``ki_tdflags`` and ``ki_slptime`` no sleep
is known to be idle or uninterruptible, so those two are not reported (not even as 0)."""


PROCESS_EXPORTER_STATES = ("Running", "Sleeping", "Waiting", "Zombie", "Other")
"""process-exporter's ``state`` values (``proc/read.go`` GetStates: R, S, D, Z, the rest)."""
PROCESS_EXPORTER_STATE = {
    "running": "Running",
    "sleeping": "Sleeping",
    "uninterruptible": "Waiting",
    "zombie": "Zombie",
}
"""The process-exporter state of each of ours that it names; the rest are ``Other``."""


def linux_state(letter: str) -> str:
    """Map a ``/proc/PID/stat`` state letter to the shared vocabulary."""
    return LINUX_STATES.get(letter, "unknown")


def freebsd_dump_state(ki_stat: int) -> str:
    """Map ``ki_stat`` of a crash-dump record: libkvm fills neither ``ki_tdflags`` nor
    ``ki_slptime`` there, so a sleep is ``sleeping``, without ps's uninterruptible/idle split."""
    return "sleeping" if ki_stat == SSLEEP else _FREEBSD_STATES.get(ki_stat, "unknown")


def freebsd_state(ki_stat: int, ki_tdflags: int, ki_slptime: int) -> str:
    """Map ``ki_stat`` to the shared vocabulary, splitting sleep the way ``ps`` does."""
    if ki_stat == SSLEEP:
        if not ki_tdflags & TDF_SINTR:
            return "uninterruptible"
        return "idle" if ki_slptime >= MAXSLP else "sleeping"
    return _FREEBSD_STATES.get(ki_stat, "unknown")
