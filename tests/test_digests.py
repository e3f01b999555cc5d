"""Usage records in one buffer, compared by keyed digests (kvm_exporter.sources.digests):
the tracker sees the same processes change as it does with a list of bytes."""

from __future__ import annotations

import random
import struct

import pytest
from test_usage import Run, cpu, row

from kvm_exporter.records import Hashes, Records
from kvm_exporter.sources import digests, procfs


def buffer_of(records: list[bytes], pad: int = 0) -> bytearray:
    """The records side by side, each followed by ``pad`` bytes (a census row, say)."""
    return bytearray(b"".join(r + b"\xee" * pad for r in records))


def test_records_read_back_as_written_and_equal_digests_mean_equal_records() -> None:
    assert procfs._lib is not None, "the README's test command builds kvm_exporter/_procscan"
    written = [row(pid, pid % 3, pid * 7) for pid in range(1, 200)]
    size = len(written[0])
    got = digests.records(buffer_of(written, pad=12), len(written), size + 12, size)
    assert isinstance(got, Records)
    assert list(got) == written and got[5] == written[5] and got[-1] == written[-1]
    assert got[2:4] == written[2:4] and got == written and len(got) == len(written)
    with pytest.raises(IndexError):
        got[len(written)]
    again = digests.records(buffer_of(written), len(written), size, size)
    assert isinstance(again, Records)
    assert again.digests.members() == got.digests.members()  # the same records
    assert len(got.digests.members()) == len(written)
    assert again.digests.changes(got.digests) == ([], [])
    one_byte_off = bytearray(written[0])
    one_byte_off[-1] ^= 1
    changed = digests.records(one_byte_off, 1, size, size)
    assert isinstance(changed, Records)
    assert changed.digests.digest(0) != got.digests.digest(0)
    first = digests.records(bytearray(written[0]), 1, size, size)
    assert isinstance(first, Records)
    assert changed.digests.changes(first.digests) == ([0], [got.digests.digest(0)])


def test_the_tracker_counts_alike_from_records_and_from_bytes() -> None:
    """Random polls of growth, exits and pid reuse: every series the same either way."""
    rng = random.Random(7)
    lists, buffers = Run(max_accounts=5), Run(max_accounts=5)
    procs: dict[int, list[int]] = {}
    for poll in range(60):
        for pid in list(procs):
            if rng.random() < 0.1:
                del procs[pid]
            else:
                procs[pid][1] += rng.randrange(3) * rng.randrange(40)
        for _ in range(rng.randrange(4)):
            procs[rng.randrange(1, 60)] = [rng.randrange(6), 0, lists.clock + (poll > 0)]
        written = [row(p, uid, ticks, start=start) for p, (uid, ticks, start) in procs.items()]
        size = len(written[0]) if written else struct.calcsize("=10q16s4q")
        as_records = digests.records(buffer_of(written), len(written), size, size)
        assert isinstance(as_records, Records)
        assert cpu(lists.poll(*written)) == cpu(buffers.update(as_records))


def test_trackers_of_one_survey_keep_one_copy_of_each_record() -> None:
    """The resources' and the named groups' trackers both keep every record: one bytes
    object each, not one per tracker (a 3,000-process burst's peak, issue 23)."""
    written = [row(pid, pid % 3, pid * 7) for pid in range(1, 50)]
    size = len(written[0])
    survey = digests.records(buffer_of(written), len(written), size, size)
    assert isinstance(survey, Records)
    first, second = Run(), Run()
    first.update(survey)
    second.update(survey)
    kept = [{id(record) for record in run.tracker._records.values()} for run in (first, second)]
    assert len(kept[0]) == len(written) and kept[0] == kept[1]


def test_two_records_of_one_digest_are_told_apart_by_their_bytes() -> None:
    """A collision (odds under 1e-9 a poll at 100,000 processes) costs one slower poll,
    not a process: the tracker compares that poll by the bytes' own hashes."""
    lists, colliding = Run(), Run()
    one_digest = digests._ffi.new("uint64_t[]", [42, 42])
    for ticks in (0, 100, 250):
        written = [row(1, 5, ticks), row(2, 6, 2 * ticks)]
        size = len(written[0])
        same = Records(buffer_of(written), size, size, 2, digests.compiled(one_digest, 2))
        assert cpu(lists.poll(*written)) == cpu(colliding.update(same))
    assert cpu(colliding.update(same)) == {"u5": 2.5, "u6": 5.0}


def test_compiled_changes_are_the_sets_differences() -> None:
    """The C comparison of two polls' digests gives what Python's sets give: the positions
    of the new digests in poll order and the digests gone, whatever the overlap, also
    against a poll compared by the bytes' hashes and against none (a first poll)."""
    rng = random.Random(11)
    for _ in range(200):
        pool = [rng.getrandbits(64) | 1 for _ in range(rng.randrange(1, 300))]
        last_order = rng.sample(pool, rng.randrange(len(pool) + 1))
        order = rng.sample(pool, rng.randrange(len(pool) + 1))
        last = digests.compiled(digests._ffi.new("uint64_t[]", last_order), len(last_order))
        here = digests.compiled(digests._ffi.new("uint64_t[]", order), len(order))
        assert last is not None and here is not None
        fresh, stale = here.changes(last)
        assert fresh == [at for at, d in enumerate(order) if d not in set(last_order)]
        assert sorted(stale) == sorted(set(last_order) - set(order))
        assert here.changes(None) == (list(range(len(order))), [])
        hashed = Hashes(written := [d.to_bytes(8, "little") for d in last_order])
        fresh, stale = here.changes(hashed)  # other kinds of digest: nothing in common
        assert fresh == list(range(len(order))) and sorted(stale) == sorted(map(hash, written))


def test_a_digest_of_zero_or_twice_is_no_compiled_set() -> None:
    """0 marks a free slot of the C set, and a digest twice is two records with one: both
    leave that poll to the bytes' hashes."""
    assert digests.compiled(digests._ffi.new("uint64_t[]", [5, 0, 7]), 3) is None
    assert digests.compiled(digests._ffi.new("uint64_t[]", [5, 9, 5]), 3) is None
    assert digests.compiled(digests._ffi.new("uint64_t[]", [5, 9, 7]), 3) is not None


def test_no_word_a_process_writes_makes_the_digest_forget_what_came_before() -> None:
    """A process writes its own comm (prctl, on Linux any bytes but NUL): no 8 bytes of it
    may zero the digest's state, which would drop the key and every field before it (pid,
    start, uid, memory), so that two processes, or one whose uid or memory changed, digest
    alike whatever the key."""
    assert digests._lib is not None
    mum_zero = struct.pack("<Q", 0xA0761D6478BD642F)  # w ^ this constant = 0
    size = 112
    for at in range(8, size, 8):
        pair = [
            struct.pack("=2q", pid, uid)[:at].ljust(at, b"\0") + mum_zero.ljust(size - at, b"\1")
            for pid, uid in ((10, 1000), (11, 0))
        ]
        got = digests.records(buffer_of(pair), 2, size, size)
        assert isinstance(got, Records)
        # Two alike would leave the poll to the bytes' hashes: no compiled set.
        assert isinstance(got.digests, digests.CompiledDigests), f"alike: the word at {at}"
