"""The lean procfs scan, the two-stage aggregation and the cached exposition give the same
answers as the obvious implementations."""

from __future__ import annotations

import gzip
import os
import random
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from conftest import copy_proc_fixture, wait_until
from prometheus_client import CollectorRegistry, Gauge, make_wsgi_app

from kvm_exporter.aggregate import MIN_SERIES, OTHER, aggregate, user_names
from kvm_exporter.exposition import cached_metrics_app
from kvm_exporter.quick import WouldBlock, without_blocking
from kvm_exporter.records import NO_TTY, Proc, census_of
from kvm_exporter.sources import procfs
from kvm_exporter.sources.procfs import ProcfsSource, parse_stat
from kvm_exporter.states import STATES, linux_state

STAT_TAIL = (
    "S 1 7 7 34817 7 4194560 1 0 0 0 12 34 0 0 20 0 3 0 5000 8192000 150 18446744073709551615"
)


def fake_proc(root: Path, pid: int, comm: str, uid: int, ruid: int, tail: str = STAT_TAIL) -> None:
    d = root / str(pid)
    d.mkdir()
    os.chown(d, uid, -1)
    (d / "stat").write_bytes(f"{pid} ({comm}) {tail}\n".encode())
    (d / "status").write_text(
        f"Name:\tx\nState:\tS (sleeping)\nUid:\t{ruid}\t{uid}\t{uid}\t{uid}\nGid:\t0\t0\t0\t0\n"
    )


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    (tmp_path / "loadavg").write_text("0.1 0.2 0.3 1/100 42\n")
    (tmp_path / "stat").write_text("cpu 1 2 3\nbtime 1700000000\n")
    (tmp_path / "self").mkdir()  # not a pid: ignored
    return tmp_path


def test_fake_procfs_records(fake_root: Path) -> None:
    fake_proc(fake_root, 10, "plain", 0, 0)
    fake_proc(fake_root, 11, "a) (b c", 65534, 1000)
    fake_proc(
        fake_root, 12, "new\nline)", 5, 6, tail=STAT_TAIL.replace("S 1 7 7 34817", "Z 2 7 7 0")
    )
    (fake_root / "13").mkdir()  # vanished: the directory is listed, its files are gone
    (fake_root / "14").mkdir()
    (fake_root / "14" / "stat").write_bytes(b"")  # being reaped
    (fake_root / "14" / "status").write_bytes(b"")
    procs = {p.pid: p for p in ProcfsSource(str(fake_root)).procs()}
    assert sorted(procs) == [10, 11, 12]
    clk = os.sysconf("SC_CLK_TCK")
    assert procs[10] == Proc(
        pid=10,
        ppid=1,
        uid=0,
        ruid=0,
        tty="pts/1",
        state="sleeping",
        comm="plain",
        threads=3,
        rss_bytes=150 * os.sysconf("SC_PAGE_SIZE"),
        vsize_bytes=8192000,
        cpu_seconds=(12 + 34) / clk,
        start_time=1700000000 + 5000 / clk,
    )
    assert (procs[11].comm, procs[11].uid, procs[11].ruid) == ("a) (b c", 65534, 1000)
    assert (procs[12].comm, procs[12].state, procs[12].tty, procs[12].ppid) == (
        "new\nline)",
        "zombie",
        NO_TTY,
        2,
    )


def reference_procs(root: str = "/proc") -> dict[int, tuple[Any, ...]]:
    """The obvious per-pid parse with parse_stat; pids that vanish mid-read are left out."""
    out = {}
    for name in os.listdir(root):
        if not name.isdigit():
            continue
        try:
            stat = Path(root, name, "stat").read_bytes()
            status = Path(root, name, "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        comm, f = parse_stat(stat)
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        ruid, uid = (int(v) for v in uid_line.split()[1:3])
        out[int(name)] = (int(f[1]), uid, ruid, linux_state(f[0].decode()), comm, int(f[4]))
    return out


def without_state(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return row[:3] + row[4:5]


@pytest.fixture
def sleepers() -> Iterable[list[int]]:
    """Twelve processes of our own that hold still while the scans run, so the comparison has
    material even on a host where little else runs."""
    children = [subprocess.Popen(["sleep", "60"]) for _ in range(12)]
    wait_until(
        lambda: all(Path(f"/proc/{c.pid}/comm").read_text() == "sleep\n" for c in children),
        what="sleepers to exec",
    )
    yield [c.pid for c in children]
    for c in children:
        c.kill()
        c.wait()


def test_live_proc_matches_reference(sleepers: list[int]) -> None:
    before = reference_procs()
    ours = {p.pid: (p.ppid, p.uid, p.ruid, p.comm) for p in ProcfsSource().procs()}
    after = reference_procs()
    assert ours[os.getpid()][1:3] == (os.geteuid(), os.getuid())
    # Only processes that did not change while the three scans ran (no exec, reparenting or
    # setuid in between), and no kernel threads, which rename themselves as they take work.
    stable = [
        pid
        for pid in set(before) & set(ours) & set(after)
        if without_state(before[pid]) == without_state(after[pid])  # a state may change
        and pid != 2
        and before[pid][0] != 2
    ]
    assert set(sleepers) <= set(stable)
    for pid in stable:
        assert ours[pid] == without_state(before[pid]), pid


def naive_aggregate(
    procs: Iterable[Proc], labels: tuple[str, ...], name: Any
) -> tuple[dict[tuple[str, ...], int], dict[tuple[str, ...], int]]:
    processes: dict[tuple[str, ...], int] = {}
    threads: dict[tuple[str, ...], int] = {}
    for p in procs:
        values = {"user": name(p.uid), "tty": p.tty, "state": p.state}
        key = tuple(values[label] for label in labels)
        processes[key] = processes.get(key, 0) + 1
        threads[key] = threads.get(key, 0) + p.threads
    return processes, threads


def random_procs(n: int, seed: int) -> list[Proc]:
    rng = random.Random(seed)
    return [
        Proc(
            pid,
            1,
            rng.choice((0, 0, 1, 2, 65534, 4242)),
            0,
            rng.choice((NO_TTY, NO_TTY, "pts/0", "pts/1", "tty1")),
            rng.choice(STATES[:5]),
            "x",
            rng.choice((1, 1, 1, 7)),
            0,
            0,
            0.0,
            0.0,
        )
        for pid in range(n)
    ]


LABEL_SETS = [
    ("user", "tty", "state"),
    ("state", "user"),
    ("tty",),
    ("state",),
    ("user",),
    (),
]


@pytest.mark.parametrize("labels", LABEL_SETS)
def test_aggregate_matches_naive_counts(labels: tuple[str, ...]) -> None:
    procs = random_procs(3000, seed=len(labels))
    # uids 1 and 2 share a name: their groups must add up
    names = {0: "root", 1: "twin", 2: "twin", 65534: "nobody"}

    def name(uid: int) -> str:
        return names.get(uid, str(uid))

    counts = aggregate(census_of(iter(procs)), labels, 10_000, name)  # any iterable, walked once
    processes, threads = naive_aggregate(procs, labels, name)
    state_at = labels.index("state") if "state" in labels else None
    for state in STATES:
        if state_at is not None and not any(k[state_at] == state for k in processes):
            key = tuple(state if i == state_at else OTHER for i in range(len(labels)))
            processes[key] = threads[key] = 0
    assert counts.processes == processes
    assert counts.threads == threads
    assert counts.folded == 0


def test_aggregate_fold_keeps_totals() -> None:
    procs = random_procs(5000, seed=9)
    labels = ("user", "tty", "state")
    counts = aggregate(census_of(procs), labels, MIN_SERIES, user_names())
    assert len(counts.processes) <= MIN_SERIES
    assert counts.folded > 0
    assert sum(counts.processes.values()) == len(procs)
    assert sum(counts.threads.values()) == sum(p.threads for p in procs)


def registry_with(value: float) -> tuple[CollectorRegistry, Gauge]:
    registry = CollectorRegistry()
    gauge = Gauge("g", "A gauge.", ["l"], registry=registry)
    gauge.labels("a").set(value)
    return registry, gauge


def call(app: Any, **environ: str) -> tuple[str, dict[str, str], bytes]:
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        seen["status"], seen["headers"] = status, dict(headers)

    env = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": "", **environ}
    body = b"".join(app(env, start_response))
    return seen["status"], seen["headers"], body


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"HTTP_ACCEPT": "application/openmetrics-text; version=1.0.0"},
        {"HTTP_ACCEPT_ENCODING": "gzip"},
        {"QUERY_STRING": "name[]=g"},
        {"REQUEST_METHOD": "OPTIONS"},
    ],
)
def test_cached_exposition_equals_stock(environ: dict[str, str]) -> None:
    registry, _ = registry_with(1)
    stock = call(make_wsgi_app(registry), **environ)
    cached = call(cached_metrics_app(registry, lambda: 1), **environ)
    assert cached[0] == stock[0]
    assert cached[1].get("Content-Type") == stock[1].get("Content-Type")
    if environ.get("HTTP_ACCEPT_ENCODING"):
        assert gzip.decompress(cached[2]) == gzip.decompress(stock[2])
    else:
        assert cached[2] == stock[2]


def test_cached_exposition_renders_once_per_key() -> None:
    registry, gauge = registry_with(1)
    key: list[object] = ["snapshot-1"]
    app = cached_metrics_app(registry, lambda: key[0])
    first = call(app)[2]
    gauge.labels("a").set(2)
    assert call(app)[2] == first, "same key: the rendered body is served again"
    key[0] = "snapshot-2"
    assert b"2.0" in call(app)[2]
    gauge.labels("a").set(3)
    key[0] = None
    assert b"3.0" in call(app)[2], "no key: rendered on every request"


def test_the_event_loop_gets_the_rendered_body_and_never_renders() -> None:
    """Inside without_blocking (the web event loop), a body not rendered yet, a filtered
    scrape and collect-on-scrape raise WouldBlock instead of rendering; the rendered body is
    served there as often as asked, with one render in all."""
    registry, _ = registry_with(1)
    renders = []
    real = registry.collect
    registry.collect = lambda: (renders.append(1), (yield from real()))[1]  # type: ignore[method-assign]
    key: list[object] = ["snapshot-1"]
    app = cached_metrics_app(registry, lambda: key[0])
    with without_blocking():
        with pytest.raises(WouldBlock):
            call(app)
        assert not renders
    first = call(app)[2]  # a worker renders
    with without_blocking():
        assert all(call(app)[2] == first for _ in range(50))
        with pytest.raises(WouldBlock):
            call(app, QUERY_STRING="name[]=g")
        key[0] = None
        with pytest.raises(WouldBlock):
            call(app)
    assert len(renders) == 1


def test_census_compiled_python_and_full_records_agree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the fixture tree (hostile names, every state, threads): the C census, the Python
    census and the census of the full records are the same counts."""
    source = ProcfsSource(str(copy_proc_fixture(tmp_path / "proc")))
    assert procfs._lib is not None, "the README's test command builds kvm_exporter/_procscan"
    expected = census_of(source.procs())
    assert sum(expected.values()) == 10
    assert source.census() == expected
    monkeypatch.setattr(procfs, "_lib", None)
    assert source.census() == expected


def test_live_census_compiled_and_python_agree(
    sleepers: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    source = ProcfsSource()
    compiled = source.census()
    monkeypatch.setattr(procfs, "_lib", None)
    python = source.census()
    mine = (0, NO_TTY, "sleeping", 1, 0)
    assert compiled[mine] >= len(sleepers) and python[mine] >= len(sleepers)
    # Processes come and go between the two scans, a few at most on this test machine.
    assert abs(sum(compiled.values()) - sum(python.values())) <= 5
    assert sum(abs(compiled.get(k, 0) - python.get(k, 0)) for k in compiled | python) <= 10
