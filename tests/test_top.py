"""The top processes by CPU and memory (``top``): the sets, their series budget, the labels."""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from conftest import copy_proc_fixture, samples
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry
from test_usage import SPEC, row

from kvm_exporter.collector import KvmCollector, ReloadStatus
from kvm_exporter.config import ConfigError, TopConfig, parse_config
from kvm_exporter.groups.rules import parse_process_names
from kvm_exporter.poller import Poller, Settings
from kvm_exporter.records import USAGE_PID, split_argv
from kvm_exporter.sources.procfs import ProcfsSource
from kvm_exporter.top import CPU, MEMORY, Watch, choose, escape_cmdline
from kvm_exporter.usage import Attribution, Tracker

TOP_FAMILIES = (
    "kvm_top_process_cpu_seconds_total",
    "kvm_top_process_resident_memory_bytes",
    "kvm_top_process_start_time_seconds",
)


class Polls:
    """A tracker with a watch, polled in turn as the poller does."""

    def __init__(self, n: int, by: tuple[str, ...] = (CPU, MEMORY)) -> None:
        self.watch = Watch(n, by, SPEC)
        self.tracker = Tracker(Attribution(lambda r, _: r[3]), SPEC, watch=self.watch)
        self.clock = 1000

    def poll(self, records: Iterable[bytes]) -> dict[str, frozenset[int]]:
        """Each set's pids after a poll of ``records``; the rows ranked are their union."""
        self.tracker.update(list(records), self.clock)
        self.clock += 10
        chosen = [r[USAGE_PID] for r in self.watch.rank()]
        sets = {by: self.watch.members(by) for by in (CPU, MEMORY)}
        assert sorted(chosen) == sorted(sets[CPU] | sets[MEMORY])
        return sets


def reference(values: dict[int, int], members: frozenset[int], n: int) -> frozenset[int]:
    """The rule over every process, no floor: what the watch's few candidates must give."""
    return frozenset(choose(dict(values), values, set(members), n))


def test_the_cpu_set_is_the_top_n_of_the_interval_and_never_an_idle_process() -> None:
    polls = Polls(2)
    assert polls.poll(row(p, 0, 1000 * p) for p in range(1, 6))[CPU] == set()  # a baseline
    grown = {1: 50, 2: 10, 3: 0, 4: 30, 5: 0}  # 3 and 5 used no CPU; 5 is the biggest user
    assert polls.poll(row(p, 0, 1000 * p + grown[p]) for p in range(1, 6))[CPU] == {1, 4}
    only = polls.poll(row(p, 0, 1000 * p + grown[p] + (p == 2)) for p in range(1, 6))
    assert only[CPU] == {2}  # the others idled: out, however much they used before


def test_a_process_born_since_the_last_poll_ranks_by_all_it_used() -> None:
    polls = Polls(1)
    polls.poll([row(1, 0, 10, start=100)])
    assert polls.poll([row(1, 0, 15, start=100), row(2, 0, 7, start=1005)])[CPU] == {2}


def test_the_memory_set_follows_the_rule_through_growth_exits_and_pid_reuse() -> None:
    """The watch ranks only the processes above its floor; a full ranking of every process
    after each poll must choose the same sets."""
    rng = random.Random(22)
    n, polls = 3, Polls(3, (MEMORY,))
    rss = {pid: rng.randrange(1, 10**9) for pid in range(1, 301)}
    starts = dict.fromkeys(rss, 100)
    expected: frozenset[int] = frozenset()
    for step in range(300):
        kept = dict(starts)
        for pid in rng.sample(sorted(rss), 20):  # a few grow or shrink, some a lot
            rss[pid] = (
                rng.randrange(1, 10**9) if rng.random() < 0.3 else rss[pid] + rng.randrange(-9, 10)
            )
        for pid in rng.sample(sorted(rss), 3):  # exits, and a new process on the same pid
            if rng.random() < 0.5:
                rss[pid], starts[pid] = rng.randrange(1, 10**9), 200 + step
            else:
                del rss[pid]
        for _ in range(2):
            pid = rng.randrange(301, 400)
            if pid not in rss:
                rss[pid], starts[pid] = rng.randrange(1, 10**9), 200 + step
        if step % 50 == 7:  # the largest exit together: the floor must be set afresh
            for pid in sorted(rss, key=rss.__getitem__)[-4 * n :]:
                del rss[pid]
        got = polls.poll(row(p, 0, 0, rss=r, start=starts[p]) for p, r in rss.items())
        alive = {pid for pid in expected if pid in rss and starts[pid] == kept[pid]}
        expected = reference(rss, frozenset(alive), n)
        assert got[MEMORY] == expected, step
        assert got[CPU] == set()


def test_an_exact_tie_keeps_the_set_as_it_is() -> None:
    polls = Polls(10)
    ticks = dict.fromkeys(range(1, 201), 0)
    polls.poll(row(p, 0, 0, rss=50) for p in ticks)
    first = polls.poll(row(p, 0, 7, rss=50) for p in ticks)
    for step in range(2, 30):
        sets = polls.poll(row(p, 0, 7 * step, rss=50) for p in ticks)
        assert sets == first
    assert len(first[CPU]) == len(first[MEMORY]) == 10


@pytest.mark.parametrize(("jitter", "most_new"), [(3, 0), (60, 10)])
def test_churn_among_nearly_equal_processes_stays_within_the_budget(
    jitter: int, most_new: int
) -> None:
    """200 processes using nearly the same CPU and memory, each poll a little more or less:
    each set holds at most 2 n processes and takes in at most n per poll; jitter within the
    margin (3%) makes no new series once the sets are full, more (60%) at most n a poll."""
    rng, n = random.Random(7), 10
    polls = Polls(n)
    ticks = dict.fromkeys(range(1, 201), 0)
    before = polls.poll(row(p, 0, 0, rss=1000) for p in ticks)  # the baseline: no CPU set
    entered = []
    for step in range(200):
        for pid in ticks:
            ticks[pid] += 100 + rng.randint(-jitter, jitter)
        rss = {p: 1000 + 10 * rng.randint(-jitter, jitter) for p in ticks}
        sets = polls.poll(row(p, 0, t, rss=rss[p]) for p, t in ticks.items())
        for by in (CPU, MEMORY):
            assert n <= len(sets[by]) <= 2 * n
            assert len(sets[by] - before[by]) <= n
            if step > 0:  # the first fill of the CPU set is not churn
                entered.append(len(sets[by] - before[by]))
        before = sets
    assert max(entered) == most_new


def test_a_process_well_above_the_set_enters_at_once_and_one_well_below_leaves() -> None:
    polls = Polls(2, (CPU,))
    ticks = dict.fromkeys(range(1, 7), 0)
    polls.poll(row(p, 0, t) for p, t in ticks.items())
    idle = {4: 1, 5: 1, 6: 1}
    steps = [
        {1: 100, 2: 90, 3: 80, **idle},
        {1: 100, 2: 90, 3: 105, **idle},
        {1: 100, 2: 5, 3: 90, 5: 50, 6: 40},
    ]
    sets = []
    for grown in steps:
        for pid, amount in grown.items():
            ticks[pid] += amount
        sets.append(polls.poll(row(p, 0, t) for p, t in ticks.items())[CPU])
    assert sets[0] == {1, 2}
    assert sets[1] == {1, 2}  # 3 leads by less than the margin: no new series
    assert sets[2] == {1, 3}  # 2 fell below rank 4 and far below the second: out


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("top: {nn: 3}", "top.nn: unknown key (expected one of by, cmdline, n)"),
        ("top: {n: 0}", "top.n: got 0, expected an integer from 1 to 1000"),
        ("top: {by: []}", "top.by: got [], expected a non-empty list drawn from cpu, memory"),
        ("top: {by: [cpu, disk]}", "top.by: got ['cpu', 'disk'], expected a list drawn from"),
        ("top: {cmdline: -1}", "top.cmdline: got -1, expected an integer from 0 to 4096"),
        ("top: {cmdline: yes}", "top.cmdline: got True, expected an integer"),
    ],
)
def test_bad_top_settings_are_refused_with_the_key(text: str, error: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape("<config>: " + error)):
        parse_config(text)


def test_top_is_off_unless_given() -> None:
    assert parse_config("interval: 15").top is None
    assert parse_config("top: {n: 3}").top == TopConfig(3, ("cpu", "memory"), 0)
    assert parse_config("top: {by: [memory], cmdline: 20}").top == TopConfig(10, ("memory",), 20)


def test_control_characters_are_escaped_and_the_cut_is_in_characters() -> None:
    assert escape_cmdline(["sh", "-c", "a\nb\x1b[1m\x9b"], 100) == "sh -c a\\x0ab\\x1b[1m\\x9b"
    assert escape_cmdline(["mysql", "--password=hunter2"], 5) == "mysql"
    assert escape_cmdline([], 8) == ""
    assert escape_cmdline(split_argv(b"caf\xc3\xa9\0\xff\xfe\0"), 9) == "café \\xff\\xfe"


def set_stat(root: Path, pid: int, field: int, value: int) -> None:
    """Set field ``field`` (proc(5)'s numbering: 14 is utime, 24 rss) of ``root/pid/stat``."""
    stat = root / str(pid) / "stat"
    head, _, tail = stat.read_text().rpartition(")")
    fields = tail.split(" ")  # tail starts with a space: field 3, the state, is fields[1]
    fields[field - 2] = str(value)
    stat.write_text(head + ")" + " ".join(fields))


def exposition(poller: Poller) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    registry = CollectorRegistry()
    registry.register(
        KvmCollector(poller.snapshot, lambda: "procfs", lambda: ReloadStatus(True, 0, 0.0))
    )
    return samples(generate_latest(registry).decode())


def top_series(metrics: dict[Any, float], name: str) -> dict[str, dict[str, str]]:
    """The labels of each series of ``name``, by pid (and mode, for the CPU counter)."""
    return {
        dict(labels)["pid"] + dict(labels).get("mode", ""): dict(labels)
        for (metric, labels), _ in metrics.items()
        if metric == name
    }


class Reads(ProcfsSource):
    """A procfs source that records whose arguments it read."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.argv_read: list[int] = []

    def argv(self, pid: int) -> tuple[str, ...] | None:
        self.argv_read.append(pid)
        return super().argv(pid)


def test_series_labels_values_and_arguments_read_only_for_the_top_set(tmp_path: Path) -> None:
    root = copy_proc_fixture(tmp_path / "proc")
    (root / "201" / "cmdline").write_bytes(b'evil\0--token="s3cr\\et"\nx\0\x1b]0;pwned\x07\0')
    source = Reads(str(root))
    set_stat(root, 400, 24, 900)  # the most resident memory
    poller = Poller(source, Settings(top=TopConfig(1, ("cpu", "memory"), 30)))
    assert poller.poll().top is not None
    set_stat(root, 201, 14, 500)  # 250 ticks more user time: the only CPU used
    poller.poll()
    metrics = exposition(poller)
    cpu = top_series(metrics, "kvm_top_process_cpu_seconds_total")
    memory = top_series(metrics, "kvm_top_process_resident_memory_bytes")
    procs = {p.pid: p for p in source.procs()}
    assert set(memory) == {"201", "400"}  # the CPU set's and the memory set's
    assert set(cpu) == {"201user", "201system", "400user", "400system"}  # each: all three
    assert memory["201"]["comm"] == procs[201].comm == "evil) R 1 (x"
    assert memory["201"]["cmdline"] == 'evil --token="s3cr\\et"\\x0ax \\x1b]0;p'
    assert set(memory["201"]) == {"pid", "comm", "user", "cmdline"}
    key = frozenset(memory["201"].items())
    assert metrics["kvm_top_process_resident_memory_bytes", key] == procs[201].rss_bytes
    assert metrics["kvm_top_process_start_time_seconds", key] == procs[201].start_time
    own = metrics["kvm_top_process_cpu_seconds_total", key | {("mode", "user")}]
    own += metrics["kvm_top_process_cpu_seconds_total", key | {("mode", "system")}]
    assert own == pytest.approx(procs[201].cpu_seconds)
    assert sorted(set(source.argv_read)) == [201, 400]  # no one else's argv
    assert len(source.argv_read) == 2  # each read once while it stays in the set
    poller.poll()
    assert len(source.argv_read) == 2


def test_off_by_default_no_top_series_and_no_argv_read(tmp_path: Path) -> None:
    source = Reads(str(copy_proc_fixture(tmp_path / "proc")))
    poller = Poller(source, Settings())
    poller.poll()
    metrics = exposition(poller)
    assert not [m for m, _ in metrics if m in TOP_FAMILIES]
    assert source.argv_read == []


def test_named_group_label_and_top_without_resources(tmp_path: Path) -> None:
    root = copy_proc_fixture(tmp_path / "proc")
    rules = parse_process_names([{"name": "shells", "comm": ["bash"]}])
    settings = Settings(interval=0, groups=rules, resources=None, top=TopConfig(20, ("memory",), 0))
    poller = Poller(ProcfsSource(str(root)), settings)
    snap = poller.poll()
    assert snap.resources is None and snap.top is not None
    memory = top_series(exposition(poller), "kvm_top_process_resident_memory_bytes")
    assert memory["200"]["group"] == "shells"
    assert memory["1"]["group"] == ""  # no rule names init: the label is empty
    assert set(memory["1"]) == {"pid", "comm", "user", "group"}
    assert not [m for m, _ in exposition(poller) if m == "kvm_resident_memory_bytes"]


def test_the_shipped_config_documents_the_defaults() -> None:
    text = (Path(__file__).parent.parent / "config" / "kvm_exporter.yml").read_text()
    example = re.findall(r"^# (top:)$|^#   ((?:n|by|cmdline): .*)$", text, re.M)
    assert len(example) == 4
    yaml = "\n".join(top or f"  {key}" for top, key in example)
    assert parse_config(yaml).top == TopConfig()


def test_a_running_exporter_serves_the_top_set_its_config_file_asks_for(
    tmp_path: Path, exporter: Any
) -> None:
    root = copy_proc_fixture(tmp_path / "proc")
    for pid, pages in ((400, 9000), (100, 8000), (1, 7000)):
        set_stat(root, pid, 24, pages)
    e = exporter(f"procfs: {{root: {root}}}\ntop: {{n: 2, by: [memory]}}\n")
    memory = top_series(e.metrics(), "kvm_top_process_resident_memory_bytes")
    assert set(memory) == {"400", "100"}
    assert memory["100"]["comm"] == "sshd"
