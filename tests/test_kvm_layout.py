"""The cffi declarations against the verified ABI facts (../shared/freebsd-abi.md)."""

from __future__ import annotations

import sys

import pytest

from kvm_exporter.records import SourceError
from kvm_exporter.sources import libkvm
from kvm_exporter.sources.kvm_cdef import KINFO_PROC_TYPES, ffi

# field: (LP64 offset, size), (i386 offset, size), (armv7 offset, size), from section 3.2.
KINFO_PROC = {
    "ki_structsize": ((0, 4), (0, 4), (0, 4)),
    "ki_layout": ((4, 4), (4, 4), (4, 4)),
    "ki_pid": ((72, 4), (40, 4), (40, 4)),
    "ki_ppid": ((76, 4), (44, 4), (44, 4)),
    "ki_pgid": ((80, 4), (48, 4), (48, 4)),
    "ki_tpgid": ((84, 4), (52, 4), (52, 4)),
    "ki_sid": ((88, 4), (56, 4), (56, 4)),
    "ki_tsid": ((92, 4), (60, 4), (60, 4)),
    "ki_jobc": ((96, 2), (64, 2), (64, 2)),
    "ki_tdev_freebsd11": ((100, 4), (68, 4), (68, 4)),
    "ki_uid": ((168, 4), (136, 4), (136, 4)),
    "ki_ruid": ((172, 4), (140, 4), (140, 4)),
    "ki_svuid": ((176, 4), (144, 4), (144, 4)),
    "ki_rgid": ((180, 4), (148, 4), (148, 4)),
    "ki_svgid": ((184, 4), (152, 4), (152, 4)),
    "ki_size": ((256, 8), (224, 4), (224, 4)),
    "ki_rssize": ((264, 8), (228, 4), (228, 4)),
    "ki_swrss": ((272, 8), (232, 4), (232, 4)),
    "ki_tsize": ((280, 8), (236, 4), (236, 4)),
    "ki_dsize": ((288, 8), (240, 4), (240, 4)),
    "ki_ssize": ((296, 8), (244, 4), (244, 4)),
    "ki_pctcpu": ((308, 4), (252, 4), (252, 4)),
    "ki_estcpu": ((312, 4), (256, 4), (256, 4)),
    "ki_slptime": ((316, 4), (260, 4), (260, 4)),
    "ki_swtime": ((320, 4), (264, 4), (264, 4)),
    "ki_cow": ((324, 4), (268, 4), (268, 4)),
    "ki_runtime": ((328, 8), (272, 8), (272, 8)),
    "ki_start": ((336, 16), (280, 8), (280, 16)),
    "ki_childtime": ((352, 16), (288, 8), (296, 16)),
    "ki_flag": ((368, 8), (296, 4), (312, 4)),
    "ki_kiflag": ((376, 8), (300, 4), (316, 4)),
    "ki_stat": ((388, 1), (308, 1), (324, 1)),
    "ki_nice": ((389, 1), (309, 1), (325, 1)),
    "ki_lock": ((390, 1), (310, 1), (326, 1)),
    "ki_rqindex": ((391, 1), (311, 1), (327, 1)),
    "ki_tdname": ((394, 17), (314, 17), (330, 17)),
    "ki_wmesg": ((411, 9), (331, 9), (347, 9)),
    "ki_login": ((420, 18), (340, 18), (356, 18)),
    "ki_comm": ((447, 20), (367, 20), (383, 20)),
    "ki_emul": ((467, 17), (387, 17), (403, 17)),
    "ki_loginclass": ((484, 18), (404, 18), (420, 18)),
    "ki_moretdname": ((502, 4), (422, 4), (438, 4)),
    "ki_tdev": ((560, 8), (480, 8), (496, 8)),
    "ki_oncpu": ((568, 4), (488, 4), (504, 4)),
    "ki_lastcpu": ((572, 4), (492, 4), (508, 4)),
    "ki_jid": ((592, 4), (512, 4), (528, 4)),
    "ki_numthreads": ((596, 4), (516, 4), (532, 4)),
    "ki_tid": ((600, 4), (520, 4), (536, 4)),
    "ki_pri": ((604, 4), (524, 4), (540, 4)),
    "ki_rusage": ((608, 144), (528, 72), (544, 88)),
    "ki_rusage_ch": ((752, 144), (600, 72), (632, 88)),
    "ki_sflag": ((1072, 8), (760, 4), (808, 4)),
    "ki_tdflags": ((1080, 8), (764, 4), (812, 4)),
}
ABIS = (("lp64", 1088), ("i386", 768), ("armv7", 816))


def _field_size(struct: str, field: str) -> int:
    return int(ffi.sizeof(dict(ffi.typeof(struct).fields)[field].type))


@pytest.mark.parametrize("index, abi, size", [(i, abi, size) for i, (abi, size) in enumerate(ABIS)])
def test_kinfo_proc_matches_the_facts_table(index: int, abi: str, size: int) -> None:
    struct = f"struct kinfo_proc_{abi}"
    assert ffi.sizeof(struct) == size
    actual = {f: (ffi.offsetof(struct, f), _field_size(struct, f)) for f in KINFO_PROC}
    assert actual == {f: rows[index] for f, rows in KINFO_PROC.items()}


def test_rusage_and_timeval_sizes_per_abi() -> None:
    assert [ffi.sizeof(f"struct timeval_{abi}") for abi, _ in ABIS] == [16, 8, 16]
    assert [ffi.sizeof(f"struct rusage_{abi}") for abi, _ in ABIS] == [144, 72, 88]
    # i386 packs 64-bit members at 4-byte alignment; the others at 8.
    assert [ffi.alignof(f"struct kinfo_proc_{abi}") for abi, _ in ABIS] == [8, 4, 8]


def test_kvm_swap_layout() -> None:
    offsets = {
        f: ffi.offsetof("struct kvm_swap", f) for f, _ in ffi.typeof("struct kvm_swap").fields
    }
    assert ffi.sizeof("struct kvm_swap") == 52
    assert offsets == {
        "ksw_devname": 0,
        "ksw_used": 32,
        "ksw_total": 36,
        "ksw_flags": 40,
        "ksw_reserved1": 44,
        "ksw_reserved2": 48,
    }


def test_kvm_nlist_layout_on_this_host() -> None:
    # lib/libkvm/kvm.h: { const char *n_name; unsigned char n_type; kvaddr_t n_value; }
    pointer = ffi.sizeof("void *")
    fields = ("n_name", "n_type", "n_value")
    assert [ffi.offsetof("struct kvm_nlist", f) for f in fields] == [0, pointer, 2 * pointer]
    assert _field_size("struct kvm_nlist", "n_value") == 8


def test_bytes_at_the_facts_offsets_read_back_through_every_layout() -> None:
    for index, (abi, size) in enumerate(ABIS):
        raw = bytearray(size)
        values = {"ki_pid": 4242, "ki_uid": 1001, "ki_stat": 3, "ki_tdev": 0x1_0000_0095}
        for field, value in values.items():
            offset, width = KINFO_PROC[field][index]
            raw[offset : offset + width] = value.to_bytes(width, sys.byteorder)
        record = ffi.cast(f"struct kinfo_proc_{abi} *", ffi.from_buffer(raw))
        assert {f: getattr(record, f) for f in values} == values, abi


def test_record_type_is_chosen_by_structsize_and_pointer_size() -> None:
    bits = ffi.sizeof("void *")
    for size, struct in KINFO_PROC_TYPES[bits].items():
        assert ffi.sizeof(struct) == size
        assert libkvm._record_type(size) == struct
    assert KINFO_PROC_TYPES == {
        8: {1088: "struct kinfo_proc_lp64"},
        4: {768: "struct kinfo_proc_i386", 816: "struct kinfo_proc_armv7"},
    }


def test_an_unknown_structsize_is_refused_naming_both_sizes() -> None:
    with pytest.raises(SourceError) as caught:
        libkvm._record_type(999)
    message = str(caught.value)
    assert "999" in message
    assert all(str(size) in message for size in KINFO_PROC_TYPES[ffi.sizeof("void *")])
