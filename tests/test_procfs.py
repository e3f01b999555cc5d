"""The procfs source pointed at a fixture /proc tree, and tty naming."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from kvm_exporter.records import NO_TTY, SourceError
from kvm_exporter.sources.procfs import ProcfsSource, parse_stat, tty_name

FIXTURE = Path(__file__).parent / "fixtures" / "proc"


def test_processes_parsed_from_fixture() -> None:
    procs = {p.pid: p for p in ProcfsSource(str(FIXTURE)).procs()}
    assert sorted(procs) == [1, 2, 10, 100, 200, 201, 300, 301, 400, 500]
    evil = procs[201]
    assert evil.comm == "evil) R 1 (x"  # comm ends at the last ')'
    assert (evil.state, evil.ppid, evil.tty, evil.threads) == ("running", 200, "pts/0", 4)
    assert (evil.uid, evil.ruid) == (54321, 54321)
    setuid = procs[400]  # a setuid program: ps shows the effective uid
    assert (setuid.uid, setuid.ruid, setuid.tty) == (0, 54321, "tty1")
    assert (procs[300].state, procs[301].state, procs[500].state) == (
        "stopped",
        "zombie",
        "uninterruptible",
    )
    assert procs[10].state == "idle" and procs[1].tty == NO_TTY
    p = procs[1]
    assert p.rss_bytes == 512 * os.sysconf("SC_PAGE_SIZE")
    assert p.vsize_bytes == 10485760
    clk = os.sysconf("SC_CLK_TCK")
    assert p.cpu_seconds == pytest.approx(400 / clk)
    assert p.start_time == pytest.approx(1700000000 + 12345 / clk)


def test_vanished_and_empty_pids_are_skipped(tmp_path: Path) -> None:
    root = tmp_path / "proc"
    shutil.copytree(FIXTURE, root)
    (root / "999").mkdir()  # listed, then gone before its files were read
    (root / "998").mkdir()
    (root / "998" / "stat").write_bytes(b"")
    (root / "998" / "status").write_bytes(b"")
    assert 999 not in {p.pid for p in ProcfsSource(str(root)).procs()}
    assert len(ProcfsSource(str(root)).procs()) == 10


def test_load_swap_limits() -> None:
    source = ProcfsSource(str(FIXTURE))
    assert source.loadavg() == (0.52, 1.25, 2.5)
    swap = source.swap()
    assert [(d.device, d.size_bytes, d.used_bytes) for d in swap] == [
        ("/dev/sda2", 2097148 * 1024, 1024 * 1024),
        ("/var/swap file", 1048572 * 1024, 0),  # \040 in /proc/swaps is a space
    ]
    # pid_max 32768, threads-max 63704: PIDs 1 to 32767 run out first, for threads as for
    # processes, since every Linux thread is a task with a PID of its own. The settings as
    # they are come too (node_exporter's names).
    assert source.limits() == (2, 32767, 32767, 8049616 * 1024, 32768, 63704)  # MemTotal kB


def test_threads_max_below_pid_max_is_the_task_limit(tmp_path: Path) -> None:
    root = tmp_path / "proc"
    shutil.copytree(FIXTURE, root)
    (root / "sys" / "kernel" / "threads-max").write_text("20000\n")
    (root / "meminfo").unlink()  # a procfs without meminfo has no memory total
    assert ProcfsSource(str(root)).limits() == (2, 20000, 20000, None, 32768, 20000)


def test_not_procfs_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=f"{tmp_path} does not look like procfs"):
        ProcfsSource(str(tmp_path))


def test_unreadable_file_is_a_source_error(tmp_path: Path) -> None:
    root = tmp_path / "proc"
    shutil.copytree(FIXTURE, root)
    (root / "loadavg").write_text("garbage\n")
    with pytest.raises(SourceError, match="loadavg: unexpected content"):
        ProcfsSource(str(root)).loadavg()
    (root / "swaps").unlink()
    with pytest.raises(SourceError, match="cannot read .*swaps"):
        ProcfsSource(str(root)).swap()


@pytest.mark.parametrize(
    ("tty_nr", "name"),
    [
        (0, NO_TTY),
        (136 << 8 | 3, "pts/3"),
        ((137 << 8) | 4, "pts/260"),  # the second pts major continues the numbering
        ((136 << 8) | (1 << 20), "pts/256"),  # minor bits above 255 sit at bit 20
        (4 << 8 | 1, "tty1"),
        (4 << 8 | 64, "ttyS0"),
    ],
)
def test_tty_names(tty_nr: int, name: str) -> None:
    assert tty_name(tty_nr, {}) == name


def test_other_ttys_named_from_dev() -> None:
    console = os.makedev(5, 1)
    tty_nr = (5 << 8) | 1
    assert tty_name(tty_nr, {console: "console"}) == "console"
    assert tty_name(tty_nr, {}) == "5:1"


def test_parse_stat_comm_with_newline_and_parens() -> None:
    comm, fields = parse_stat(b"7 (a\n(b) c)) S 1 7 7 0 -1\n")
    assert comm == "a\n(b) c)"
    assert fields[:3] == [b"S", b"1", b"7"]


def test_bad_limit_file_is_a_source_error(tmp_path: Path) -> None:
    root = tmp_path / "proc"
    shutil.copytree(FIXTURE, root)
    (root / "sys" / "kernel" / "pid_max").write_text("lots\n")
    with pytest.raises(SourceError, match=r"pid_max: expected an integer, got 'lots\\n'"):
        ProcfsSource(str(root)).limits()
