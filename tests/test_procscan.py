"""The compiled /proc census (kvm_exporter.sources._procscan) alone, on real files.

The extension is optional for an install, but not for the tests: CI has gcc and python3-dev,
so a missing module is a failure here, never a skip.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kvm_exporter.sources._procscan import ffi, lib

Key = tuple[int, int, str, int]  # (uid, tty_nr, state, threads)
PTS3 = (136 << 8) | 3  # tty_nr of /dev/pts/3
TTY1 = (4 << 8) | 1


def stat_bytes(pid: int, comm: bytes, state: str, tty: int = 0, threads: int = 1) -> bytes:
    """A PID/stat as the kernel writes it (52 fields; tpgid -1 as for a process with no tty)."""
    rest = [state, "1", str(pid), str(pid), str(tty), "-1", "4194560", "120", "0", "0", "0"]
    rest += ["3", "2", "0", "0", "20", "0", str(threads), "0", "4242", "8556544", "220"]
    rest += ["0"] * 30
    return b"%d (%s) %s\n" % (pid, comm, " ".join(rest).encode())


def add(root: Path, pid: int, content: bytes | None, uid: int = 0) -> Path:
    d = root / str(pid)
    d.mkdir()
    if content is not None:
        (d / "stat").write_bytes(content)
    os.chown(d, uid, 0)
    return d


def open_root(root: Path | str) -> int:
    return os.open(root, os.O_RDONLY | os.O_DIRECTORY)


def census_fd(fd: int, cap: int = 4) -> dict[Key, int]:
    """Call kvm_census as a caller would: grow the buffer while the result exceeds it."""
    while True:
        rows = ffi.new("struct kvm_census_row[]", cap)
        n = lib.kvm_census(fd, rows, cap)
        if n == -1:
            raise OSError(ffi.errno, os.strerror(ffi.errno))
        if n == -2:
            raise ValueError("malformed PID/stat")
        assert n >= 0
        if n <= cap:
            break
        cap = n
    out = {}
    for r in rows[0:n]:
        key = (r.uid, r.tty_nr, r.state.decode("latin-1"), r.threads)
        assert key not in out and r.count > 0
        out[key] = r.count
    return out


def census(root: Path | str) -> dict[Key, int]:
    fd = open_root(root)
    try:
        return census_fd(fd)
    finally:
        os.close(fd)


def raw(root: Path, cap: int = 8) -> int:
    fd = open_root(root)
    try:
        return int(lib.kvm_census(fd, ffi.new("struct kvm_census_row[]", cap), cap))
    finally:
        os.close(fd)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A procfs copy with hostile comms, zombies, threads, ttys and non-process entries."""
    root = tmp_path / "proc"
    root.mkdir()
    add(root, 1, stat_bytes(1, b"systemd", "S"))
    add(root, 2, stat_bytes(2, b"kthreadd", "S"))
    add(root, 100, stat_bytes(100, b"a) (b c", "S", 0, 1), uid=1000)
    add(root, 101, stat_bytes(101, b"\n", "S", 0, 1), uid=1000)
    add(root, 102, stat_bytes(102, b")))", "R", PTS3, 1), uid=1000)
    add(root, 103, stat_bytes(103, b" " * 15, "S", PTS3, 1), uid=1000)
    add(root, 104, stat_bytes(104, b"x) Z 9 9 9 5 ", "S", PTS3, 1), uid=1000)  # fake fields
    add(root, 105, stat_bytes(105, b"((", "Z", 0, 1), uid=1000)
    add(root, 106, stat_bytes(106, b"zombie", "Z", 0, 1), uid=1000)
    add(root, 200, stat_bytes(200, b"java", "S", 0, 57), uid=65534)
    add(root, 201, stat_bytes(201, b"java", "S", 0, 57), uid=65534)
    add(root, 202, stat_bytes(202, b"getty", "S", TTY1, 1))
    add(root, 4000000, stat_bytes(4000000, b"big pid", "D", 0, 2), uid=4294967294)
    # Not processes: ignored whatever they hold.
    for name in ("self", "net", "12abc", "1.5", "-3"):
        (root / name).mkdir()
    (root / "stat").write_bytes(b"cpu 1 2 3\n")
    (root / "loadavg").write_bytes(b"0.00 0.01 0.05 1/99 7\n")
    return root


EXPECTED: dict[Key, int] = {
    (0, 0, "S", 1): 2,
    (1000, 0, "S", 1): 2,
    (1000, PTS3, "R", 1): 1,
    (1000, PTS3, "S", 1): 2,
    (1000, 0, "Z", 1): 2,
    (65534, 0, "S", 57): 2,
    (0, TTY1, "S", 1): 1,
    (4294967294, 0, "D", 2): 1,
}


def test_counts_hostile_tree_exactly(tree: Path) -> None:
    assert census(tree) == EXPECTED


def test_dir_fd_stays_open_and_calls_repeat(tree: Path) -> None:
    fd = open_root(tree)
    try:
        os.listdir(fd)  # leaves nothing to read at the shared offset
        assert census_fd(fd) == EXPECTED
        assert census_fd(fd) == EXPECTED
        os.fstat(fd)  # still ours
    finally:
        os.close(fd)


def test_vanished_and_empty_are_skipped(tree: Path) -> None:
    add(tree, 300, None, uid=1000)  # directory left, stat gone
    add(tree, 301, b"", uid=1000)  # a pid being reaped reads as empty
    assert census(tree) == EXPECTED


def test_negative_tty_nr_is_the_kernels_u32(tmp_path: Path) -> None:
    add(tmp_path, 5, stat_bytes(5, b"sh", "S", -2147483000))
    assert census(tmp_path) == {(0, 2**32 - 2147483000, "S", 1): 1}


MALFORMED = [
    b"1 systemd S 0 1 1 0\n",  # no parens
    b"1 (systemd S 0 1 1 0\n",  # no ')'
    b"1 systemd) S 0 1 1 0\n",  # no '('
    b"1 (x)",
    b"1 (x) ",
    b"1 (x) S",
    b"1 (x) S ",
    b"1 (x)S 0 1 1 0 " + b"0 " * 20,
    b"1 (x) S 0 1 1\n",  # too few fields
    b"1 (x) S 0 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0\n",  # stops before num_threads
    stat_bytes(1, b"x", "S").replace(b" 1 1 0 -1 ", b" 1 1 0x1 -1 "),  # hex tty
    stat_bytes(1, b"x", "S", threads=3).replace(b" 0 3 0 ", b" 0 3a 0 "),
    stat_bytes(1, b"x", "S", threads=3).replace(b" 0 3 0 ", b" 0 -3 0 "),
    stat_bytes(1, b"x", "S", threads=3).replace(b" 0 3 0 ", b" 0  0 "),  # empty field
    stat_bytes(1, b"x", "S", tty=1).replace(b" 1 -1 ", b" 4294967296 -1 "),  # > u32
    b")" * 10000,  # last ')' at the end of the first 4096 bytes
    b"\0" * 300,
]


@pytest.mark.parametrize("content", MALFORMED)
def test_malformed_stat_gives_minus_two(tmp_path: Path, content: bytes) -> None:
    add(tmp_path, 1, stat_bytes(1, b"init", "S"))
    add(tmp_path, 7, content)
    assert raw(tmp_path) == -2


def test_random_garbage_never_crashes(tmp_path: Path) -> None:
    rng = random.Random(6)
    alphabet = b"() 0123456789-SZ\n\0x"
    d = add(tmp_path, 1, b"")
    for size in list(range(0, 64)) + [300, 4095, 4096, 4097, 9000] * 4:
        for _ in range(20 if size < 64 else 2):
            (d / "stat").write_bytes(bytes(rng.choice(alphabet) for _ in range(size)))
            assert raw(tmp_path) in (-2, 0, 1)


def test_other_errors_raise_oserror(tmp_path: Path) -> None:
    d = add(tmp_path, 1, None)
    (d / "stat").mkdir()  # read fails with EISDIR: not a vanished process
    with pytest.raises(OSError) as err:
        census(tmp_path)
    assert err.value.errno == errno.EISDIR
    (d / "stat").rmdir()
    d.rmdir()
    (tmp_path / "1").write_bytes(b"")  # a file where a pid directory should be
    with pytest.raises(OSError) as err:
        census(tmp_path)
    assert err.value.errno == errno.ENOTDIR


def test_bad_dir_fd(tmp_path: Path) -> None:
    rows = ffi.new("struct kvm_census_row[]", 1)
    assert lib.kvm_census(-1, rows, 1) == -1
    assert ffi.errno == errno.EBADF
    fd = os.open(tmp_path / "f", os.O_RDONLY | os.O_CREAT)
    try:
        assert lib.kvm_census(fd, rows, 1) == -1
        assert ffi.errno == errno.ENOTDIR
    finally:
        os.close(fd)


def test_cap_smaller_than_groups(tree: Path) -> None:
    fd = open_root(tree)
    try:
        rows = ffi.new("struct kvm_census_row[]", 4)
        rows[3].count = 777  # beyond cap: left alone
        assert lib.kvm_census(fd, rows, 3) == len(EXPECTED)
        got = [(r.uid, r.tty_nr, r.state.decode(), r.threads, r.count) for r in rows[0:3]]
        assert all(EXPECTED[k[:4]] == k[4] for k in got) and len(set(got)) == 3
        assert rows[3].count == 777
        assert lib.kvm_census(fd, ffi.NULL, 0) == len(EXPECTED)
        rows = ffi.new("struct kvm_census_row[]", len(EXPECTED))
        assert lib.kvm_census(fd, rows, len(EXPECTED)) == len(EXPECTED)
        assert {(r.uid, r.tty_nr, r.state.decode(), r.threads): r.count for r in rows} == EXPECTED
    finally:
        os.close(fd)


def test_table_grows_without_limit(tmp_path: Path) -> None:
    expected: dict[Key, int] = {}
    for pid in range(1, 3001):
        key = (pid % 7, pid % 5, "SRDZ"[pid % 4], pid // 4 + 1)  # 3000 distinct groups
        add(tmp_path, pid, stat_bytes(pid, b"w", key[2], key[1], key[3]), uid=key[0])
        expected[key] = expected.get(key, 0) + 1
    assert census(tmp_path) == expected
    assert raw(tmp_path, cap=1) == len(expected)


def test_concurrent_calls(tree: Path) -> None:
    results: list[dict[Key, int]] = []

    def work() -> None:
        for _ in range(50):
            results.append(census(tree))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 400 and all(r == EXPECTED for r in results)


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[Any]]]:
    # A new session: no controlling terminal, whatever runs the tests.
    procs = [subprocess.Popen(["sleep", "60"], start_new_session=True) for _ in range(12)]
    try:
        deadline = time.monotonic() + 10
        for p in procs:
            # comm first (exec done), then asleep (not still running into nanosleep)
            while (
                Path(f"/proc/{p.pid}/comm").read_text() != "sleep\n"
                or Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1][1] != "S"
            ):
                assert time.monotonic() < deadline, "sleep did not start"
                time.sleep(0.01)
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_live_proc(sleepers: list[subprocess.Popen[Any]]) -> None:
    assert os.geteuid() == 0
    before = len([d for d in os.listdir("/proc") if d.isdigit()])
    rows = census("/proc")
    after = len([d for d in os.listdir("/proc") if d.isdigit()])
    assert rows.get((0, 0, "S", 1), 0) >= 12
    assert min(before, after) - 5 <= sum(rows.values()) <= max(before, after) + 5
    assert all(k[2] in "RSDZTtXxIPKWw" and k[3] >= 0 for k in rows)


# --- kvm_survey: the census and one usage row per process, the same reads ---


def survey_of(root: Path, cap: int = 2) -> dict[int, tuple[Any, ...]]:
    """kvm_survey as procfs.py calls it: grow while the processes exceed the room."""
    fd = open_root(root)
    kinds, nprocs = ffi.new("struct kvm_census_row[]", 64), ffi.new("int *")
    try:
        while True:
            rows = ffi.new("struct kvm_usage_row[]", cap)
            n = lib.kvm_survey(fd, kinds, 64, rows, cap, nprocs)
            assert n >= 0, n
            if nprocs[0] <= cap:
                break
            cap = nprocs[0]
    finally:
        os.close(fd)
    return {
        r.pid: (r.ppid, r.uid, r.state, ffi.string(r.comm), r.threads)
        + (r.utime, r.stime, r.start, r.vsize, r.rss)
        for r in rows[0 : nprocs[0]]
    }


def test_survey_reads_each_process_of_the_hostile_tree(tree: Path) -> None:
    got = survey_of(tree)
    assert len(got) == sum(EXPECTED.values())
    # stat_bytes: ppid 1, utime 3, stime 2, starttime 4242, vsize 8556544, rss 220.
    assert got[100] == (1, 1000, ord("S"), b"a) (b c", 1, 3, 2, 4242, 8556544, 220)
    assert got[104][3] == b"x) Z 9 9 9 5 " and got[104][2] == ord("S")  # fake fields in comm
    assert got[200][4] == 57 and got[4000000][1] == 4294967294
    assert got[101][3] == b"\n" and got[105][2] == ord("Z")


def test_a_comm_is_cut_at_63_bytes_and_padded_with_nuls(tmp_path: Path) -> None:
    add(tmp_path, 1, stat_bytes(1, b"k" * 70, "S"))
    add(tmp_path, 2, stat_bytes(2, b"ab", "S"))
    fd = open_root(tmp_path)
    try:
        rows, nprocs = ffi.new("struct kvm_usage_row[]", 2), ffi.new("int *")
        assert lib.kvm_survey(fd, ffi.new("struct kvm_census_row[]", 4), 4, rows, 2, nprocs) == 1
    finally:
        os.close(fd)
    comms = sorted(bytes(ffi.buffer(r.comm)) for r in rows)
    assert comms == [b"ab" + b"\0" * 62, b"k" * 63 + b"\0"]  # equal processes, equal bytes


def test_survey_and_census_refuse_the_same_malformed_stat(tmp_path: Path) -> None:
    for content in MALFORMED:
        add(tmp_path, 1, stat_bytes(1, b"init", "S"))
        add(tmp_path, 7, content)
        fd = open_root(tmp_path)
        try:
            rows, nprocs = ffi.new("struct kvm_usage_row[]", 4), ffi.new("int *")
            kinds = ffi.new("struct kvm_census_row[]", 4)
            assert lib.kvm_survey(fd, kinds, 4, rows, 4, nprocs) == -2, content
        finally:
            os.close(fd)
        shutil.rmtree(tmp_path / "1")
        shutil.rmtree(tmp_path / "7")


def test_compiled_and_python_surveys_agree(tree: Path, monkeypatch: Any) -> None:
    from kvm_exporter.sources import procfs

    source = procfs.ProcfsSource(str(tree))
    assert procfs._USAGE_ROW.size == ffi.sizeof("struct kvm_usage_row")
    compiled = source.survey()
    monkeypatch.setattr(procfs, "_lib", None)
    python = source.survey()
    assert sorted(python.usage) == sorted(compiled.usage) and python.census == compiled.census
    pids = {source.usage_spec.decode(record)[0] for record in compiled.usage}
    assert pids == {int(d.name) for d in tree.iterdir() if d.name.isdigit()}


def test_survey_on_random_garbage_never_crashes(tmp_path: Path) -> None:
    rng = random.Random(14)
    alphabet = b"() 0123456789-SZ\n\0x"
    d = add(tmp_path, 1, b"")
    rows, nprocs = ffi.new("struct kvm_usage_row[]", 2), ffi.new("int *")
    kinds = ffi.new("struct kvm_census_row[]", 2)
    for size in list(range(0, 64)) + [300, 4095, 4096, 4097, 9000] * 4:
        for _ in range(20 if size < 64 else 2):
            (d / "stat").write_bytes(bytes(rng.choice(alphabet) for _ in range(size)))
            fd = open_root(tmp_path)
            try:
                assert lib.kvm_survey(fd, kinds, 2, rows, 2, nprocs) in (-2, 0, 1)
            finally:
                os.close(fd)


def gather(
    records: bytes,
    count: int,
    size: int,
    fields: list[tuple[int, ...]],
    rowsize: int,
    states: Any = ffi.NULL,
) -> bytes:
    """kvm_gather of ``count`` records into zeroed rows; fields as (src, dst, width, kind)."""
    table = ffi.new("struct kvm_field[]", max(len(fields), 1))
    for entry, (src, dst, width, kind) in zip(table, fields, strict=False):  # a spare one if none
        entry.src, entry.dst, entry.width, entry.kind = src, dst, width, kind
    rows = bytearray(count * rowsize)
    lib.kvm_gather(
        ffi.from_buffer(records),
        count,
        size,
        table,
        len(fields),
        states,
        ffi.from_buffer(rows),
        rowsize,
    )
    return bytes(rows)


def test_kvm_gather_copies_widens_and_keeps_the_rest_zero() -> None:
    record = struct.Struct("=bhi q 5s B I Q")  # 1+2+4+8+5+1+4+8 = 33 bytes, packed
    values = [
        (-1, -2, -3, -4, b"ab\0cd", 0xFF, 0xFFFFFFFF, 2**64 - 1),
        (127, 32767, 2**31 - 1, 2**63 - 1, b"\xff" * 5, 1, 7, 0),
        (-128, -32768, -(2**31), -(2**63), b"\0" * 5, 0, 2**31, 2**63),
    ]
    size = record.size + 3  # records need not be aligned, nor rows
    records = b"".join(record.pack(*v) + b"\x5a" * 3 for v in values)
    copy, signed, unsigned = lib.KVM_COPY, lib.KVM_SIGNED, lib.KVM_UNSIGNED
    # each field to the next 8 bytes of a row: (source offset, width, kind)
    sources = (0, 1, 3, 7, 15, 20, 21, 25, 0, 3, 21, 3)
    widths = (1, 2, 4, 8, 5, 1, 4, 8, 1, 4, 4, 4)
    kinds = (signed, signed, signed, copy, copy, unsigned, unsigned, copy, unsigned, unsigned)
    kinds += (signed, copy)
    fields = list(zip(sources, range(0, 96, 8), widths, kinds, strict=True))
    row = struct.Struct("=qqqq5s3xqqQQQq4s4x")
    got = list(row.iter_unpack(gather(records, 3, size, fields, row.size)))
    expected = [
        (
            b,
            h,
            i,
            q,
            s,
            ub,
            ui,
            uq,
            b & 0xFF,
            i & 0xFFFFFFFF,
            ui - (ui >> 31 << 32),
            struct.pack("=i", i),
        )
        for b, h, i, q, s, ub, ui, uq in values
    ]
    assert got == expected
    assert gather(records, 0, size, fields, row.size) == b""  # count 0: nothing touched
    assert gather(records, 2, size, [], 8) == b"\0" * 16  # no fields: rows stay zero


def test_kvm_gather_state_comes_from_the_tables() -> None:
    """state = word_of[stat_code[stat] | sintr[tdflags byte] | (slptime >= maxslp)]."""
    states = ffi.new("struct kvm_states *")
    states.stat, states.tdflags_low, states.slptime, states.maxslp = 0, 1, 4, 20
    states.stat_code = [4 * (i % 3) for i in range(256)]
    states.sintr = [2 if i & 8 else 0 for i in range(256)]
    states.word_of = [(i * 7 + 1) % 256 for i in range(256)]
    cases = [(0, 0, 0), (1, 8, 19), (2, 0x18, 20), (5, 0xF7, 2**32 - 1), (255, 0xFF, 21)]
    records = b"".join(struct.pack("=BB2xI", s, t, slp) for s, t, slp in cases)
    fields = [(0, 0, 1, lib.KVM_STATE), (0, 3, 1, lib.KVM_STATE)]
    rows = gather(records, len(cases), 8, fields, 4, states)
    for (stat, tdflags, slptime), r in zip(cases, struct.iter_unpack("4B", rows), strict=True):
        code = 4 * (stat % 3) | (2 if tdflags & 8 else 0) | (slptime >= 20)
        assert r == ((code * 7 + 1) % 256, 0, 0, (code * 7 + 1) % 256)


def count_keys(rows: bytes, count: int, rowsize: int, keyoff: int, keysize: int) -> list[Any]:
    """kvm_count's distinct keys (in the order first seen) and their counts."""
    keys, counts = bytearray(max(count, 1) * keysize), ffi.new("uint32_t[]", max(count, 1))
    n = lib.kvm_count(
        ffi.from_buffer(rows), count, rowsize, keyoff, keysize, ffi.from_buffer(keys), counts
    )
    assert n >= 0
    return [(bytes(keys[i * keysize : (i + 1) * keysize]), counts[i]) for i in range(n)]


def test_kvm_count_counts_equal_keys_in_the_order_first_seen() -> None:
    rng = random.Random(13)
    for keysize in (1, 5, 8, 24, 27):
        keys = [bytes(rng.getrandbits(8) for _ in range(keysize)) for _ in range(40)]
        keys += [k[:-1] + bytes([k[-1] ^ 1]) for k in keys[:5]]  # differ in the last byte only
        chosen = [rng.choice(keys) for _ in range(3000)]
        # each key between 3 bytes of noise before and 2 after, which the count must ignore
        rows = b"".join(os.urandom(3) + k + os.urandom(2) for k in chosen)
        expected = list(Counter(chosen).items())
        assert count_keys(rows, len(chosen), keysize + 5, 3, keysize) == expected
    assert count_keys(b"", 0, 24, 0, 24) == []
    assert count_keys(b"\0" * 24 * 1000, 1000, 24, 0, 24) == [(b"\0" * 24, 1000)]
