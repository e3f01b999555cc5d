"""Poller, collector and WSGI app on a fixture /proc, without sockets."""

from __future__ import annotations

import gzip
import os
import re
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
from conftest import copy_proc_fixture, wait_until
from prometheus_client import CollectorRegistry, generate_latest

from kvm_exporter.app import make_app
from kvm_exporter.groups.rules import parse_process_names
from kvm_exporter.poller import Poller, Settings
from kvm_exporter.service import build_registry
from kvm_exporter.sources.procfs import ProcfsSource
from kvm_exporter.states import STATES


@pytest.fixture
def fixture_root(tmp_path: Path) -> Path:
    return copy_proc_fixture(tmp_path / "proc")


def polled(root: Path | str, **settings: Any) -> tuple[Poller, CollectorRegistry]:
    poller = Poller(ProcfsSource(str(root)), Settings(**settings))
    poller.poll()
    return poller, build_registry(poller)


def test_process_counts_and_host_metrics(fixture_root: Path) -> None:
    _, registry = polled(fixture_root)
    value = registry.get_sample_value
    assert value("kvm_processes", {"user": "root", "tty": "none", "state": "sleeping"}) == 3
    assert value("kvm_processes", {"user": "54321", "tty": "pts/0", "state": "running"}) == 1
    assert value("kvm_threads", {"user": "54321", "tty": "pts/0", "state": "running"}) == 4
    assert value("kvm_processes", {"user": "nobody", "tty": "pts/1", "state": "zombie"}) == 1
    assert value("kvm_processes", {"user": "other", "tty": "other", "state": "traced"}) == 0
    for state in STATES:
        assert any(
            s.labels["state"] == state
            for m in registry.collect()
            if m.name == "kvm_processes"
            for s in m.samples
        )
    assert value("kvm_load15") == 2.5
    assert value("kvm_swap_size_bytes", {"device": "/var/swap file"}) == 1048572 * 1024
    assert value("kvm_swap_used_bytes", {"device": "/dev/sda2"}) == 1024 * 1024
    # Linux limits tasks: pid_max 32768 leaves PIDs 1 to 32767 (threads-max 63704 is higher).
    assert (value("kvm_cpus"), value("kvm_processes_limit")) == (2, 32767)
    assert value("kvm_threads_limit") == 32767
    assert value("kvm_up") == 1
    assert value("kvm_polls_total") == 1
    assert value("kvm_poll_success", {"collector": "procs"}) == 1
    assert value("kvm_poll_errors_total", {"collector": "swap"}) == 0
    assert value("kvm_last_successful_poll_timestamp_seconds") > 1.7e9
    info = {"version": "0.1.0", "source": "procfs"}
    assert any(
        s.labels.items() >= info.items()
        for m in registry.collect()
        if m.name == "kvm_exporter_build_info"
        for s in m.samples
    )


def test_labels_setting_changes_label_set(fixture_root: Path) -> None:
    _, registry = polled(fixture_root, labels=("state",))
    assert registry.get_sample_value("kvm_processes", {"state": "sleeping"}) == 5
    assert registry.get_sample_value("kvm_processes", {"state": "uninterruptible"}) == 1


def test_failed_part_is_dropped_not_served_stale_then_recovers(tmp_path: Path) -> None:
    root = tmp_path / "proc"
    copy_proc_fixture(root)
    poller, registry = polled(root)
    stat = (root / "1" / "stat").read_bytes()
    (root / "1" / "stat").write_bytes(b"garbage\n")  # no comm, no fields: no kernel writes that
    poller.poll()
    value = registry.get_sample_value
    assert value("kvm_up") == 0
    assert value("kvm_processes", {"user": "root", "tty": "none", "state": "sleeping"}) is None
    assert value("kvm_poll_success", {"collector": "procs"}) == 0
    assert value("kvm_poll_errors_total", {"collector": "procs"}) == 1
    assert value("kvm_poll_errors_total", {"collector": "limits"}) == 0
    assert value("kvm_load1") == 0.52  # the parts that worked are still served
    first_success = value("kvm_last_successful_poll_timestamp_seconds")
    (root / "1" / "stat").write_bytes(stat)
    poller.poll()
    assert value("kvm_up") == 1
    assert value("kvm_processes", {"user": "root", "tty": "none", "state": "sleeping"}) == 3
    assert value("kvm_poll_errors_total", {"collector": "procs"}) == 1
    assert value("kvm_polls_total") == 3
    assert value("kvm_last_successful_poll_timestamp_seconds") >= first_success


def call(app: Any, path: str, **headers: str) -> tuple[str, dict[str, str], bytes]:
    environ: dict[str, Any] = {"PATH_INFO": path, **headers}
    setup_testing_defaults(environ)
    got: dict[str, Any] = {}

    def start_response(status: str, response_headers: list[tuple[str, str]], *_: Any) -> None:
        got["status"], got["headers"] = status, dict(response_headers)

    body: Iterable[bytes] = app(environ, start_response)
    return got["status"], got["headers"], b"".join(body)


def test_wsgi_routes_negotiation_and_gzip(fixture_root: Path) -> None:
    poller, registry = polled(fixture_root)
    app = make_app(registry, "/metrics", poller.snapshot)
    status, headers, body = call(app, "/metrics")
    assert status.startswith("200") and headers["Content-Type"].startswith("text/plain")
    assert b'kvm_processes{state="zombie",tty="pts/1",user="nobody"} 1.0' in body
    status, headers, body = call(
        app, "/metrics", HTTP_ACCEPT="application/openmetrics-text; version=1.0.0"
    )
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    status, headers, body = call(app, "/metrics", HTTP_ACCEPT_ENCODING="gzip")
    assert headers["Content-Encoding"] == "gzip"
    assert b"kvm_load1 0.52" in gzip.decompress(body)
    status, headers, body = call(app, "/")
    assert status.startswith("200") and b'<a href="/metrics">' in body
    assert call(app, "/-/healthy")[0].startswith("200")
    assert call(app, "/-/ready")[0].startswith("200")
    status, _, body = call(app, "/nope")
    assert status.startswith("404")


def test_ready_reports_failing_parts(tmp_path: Path) -> None:
    root = tmp_path / "proc"
    copy_proc_fixture(root)
    poller, registry = polled(root)
    (root / "swaps").unlink()
    poller.poll()
    status, _, body = call(make_app(registry, "/metrics", poller.snapshot), "/-/ready")
    assert status.startswith("503") and body == b"Not ready: swap\n"


def test_collect_on_scrape_polls_each_time(fixture_root: Path) -> None:
    poller, registry = polled(fixture_root, interval=0)
    registry.get_sample_value("kvm_up")
    registry.get_sample_value("kvm_up")
    assert poller.snapshot().polls >= 3


class ThreadsOf(ProcfsSource):
    """A procfs source that notes the thread of each survey."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.threads: list[str] = []

    def survey(self) -> Any:
        self.threads.append(threading.current_thread().name)
        return super().survey()


def test_collect_on_scrape_polls_on_the_pollers_thread(fixture_root: Path) -> None:
    """A scrape asks the started poller's thread for a poll and waits: one thread allocates a
    poll's memory, not every web worker (each would keep its own glibc heap)."""
    source = ThreadsOf(str(fixture_root))
    poller = Poller(source, Settings(interval=0))
    poller.start()
    try:
        first = poller.snapshot().polls
        scrapers = [threading.Thread(target=poller.snapshot, name=f"web{i}") for i in range(4)]
        for scraper in scrapers:
            scraper.start()
        for scraper in scrapers:
            scraper.join(timeout=30)
        assert poller.snapshot().polls > first  # each scrape waited for a poll of its own
    finally:
        poller.stop()
    assert source.threads and set(source.threads) == {"poller"}


def test_collect_on_scrape_polls_once_per_scrape_whatever_names_are_served(
    fixture_root: Path,
) -> None:
    """node_exporter's names come from the poll the kvm_* ones did, not a second poll."""
    compat = ("node_exporter", "process_exporter")
    poller, registry = polled(fixture_root, interval=0, compat=compat)
    before = poller.scraped().polls
    body = generate_latest(registry)
    assert b"node_processes_pids" in body
    assert poller.scraped().polls == before + 1


class Gated(ProcfsSource):
    """A procfs source whose census waits while its gate is closed: a poll that hangs."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()

    def census(self) -> Any:
        self.entered.set()
        self.gate.wait(30)
        return super().census()


def scrapes(poller: Poller, n: int) -> list[threading.Thread]:
    threads = [threading.Thread(target=poller.snapshot, daemon=True) for _ in range(n)]
    for thread in threads:
        thread.start()
    return threads


def test_scrapes_waiting_for_a_poll_are_answered_when_interval_0_becomes_15s(
    fixture_root: Path,
) -> None:
    source = Gated(str(fixture_root))
    poller = Poller(source, Settings(interval=0, resources=None))
    poller.start()
    try:
        poller.snapshot()
        source.gate.clear()
        source.entered.clear()
        first = scrapes(poller, 1)
        source.entered.wait(10)  # the poller's thread is in that scrape's poll
        later = scrapes(poller, 3)  # these need a poll begun after they asked
        swap = threading.Thread(
            target=poller.reconfigure, args=(source, Settings(interval=15, resources=None))
        )
        swap.start()  # waits for the poll in progress
        source.gate.set()
        for thread in [*first, *later, swap]:
            thread.join(timeout=10)
            assert not thread.is_alive()
        assert poller.snapshot().polls >= 3
    finally:
        source.gate.set()
        poller.stop()


def test_stop_answers_a_scrape_waiting_on_a_hung_poll(fixture_root: Path) -> None:
    source = Gated(str(fixture_root))
    poller = Poller(source, Settings(interval=0, resources=None))
    poller.start()
    try:
        polls = poller.snapshot().polls
        source.gate.clear()
        source.entered.clear()
        waiting = scrapes(poller, 2)
        source.entered.wait(10)
        poller.stop()
        for thread in waiting:
            thread.join(timeout=10)
            assert not thread.is_alive()  # the poll still hangs: they got the last snapshot
        assert poller.snapshot().polls == polls
    finally:
        source.gate.set()


def test_cached_exposition_changes_with_each_poll(tmp_path: Path) -> None:
    root = tmp_path / "proc"
    copy_proc_fixture(root)
    poller, registry = polled(root)
    app = make_app(registry, "/metrics", poller.snapshot, poller.snapshot)

    def polled_part() -> bytes:  # the request counter changes with every request
        body = call(app, "/metrics")[2]
        return b"".join(x for x in body.splitlines(True) if not x.startswith(b"promhttp_"))

    first = polled_part()
    assert polled_part() == first and b"kvm_load1 0.52" in first
    (root / "loadavg").write_text("7.5 1.25 2.50 3/187 4242\n")
    assert polled_part() == first  # no poll yet: the same body
    poller.poll()
    assert b"kvm_load1 7.5" in call(app, "/metrics")[2]
    _, headers, body = call(app, "/metrics", HTTP_ACCEPT_ENCODING="gzip")
    assert headers["Content-Encoding"] == "gzip" and b"kvm_load1 7.5" in gzip.decompress(body)


def test_hung_poll_expires_the_snapshot_instead_of_serving_it_as_fresh(tmp_path: Path) -> None:
    root = tmp_path / "proc"
    copy_proc_fixture(root)
    poller, registry = polled(root, interval=0.2)
    (root / "loadavg").unlink()
    os.mkfifo(root / "loadavg")  # opening it blocks until a writer comes: a stuck read
    poller.start()
    try:
        value = registry.get_sample_value
        wait_until(lambda: value("kvm_up") == 0, timeout=10, what="the snapshot to expire")
        assert value("kvm_processes", {"user": "root", "tty": "none", "state": "sleeping"}) is None
        assert value("kvm_load1") is None
        assert value("kvm_poll_success", {"collector": "procs"}) == 0
        assert value("kvm_last_successful_poll_timestamp_seconds") > 1.7e9
    finally:
        with open(root / "loadavg", "w") as writer:  # let the stuck poll finish
            writer.write("0.1 0.2 0.3 1/1 1\n")
        # A plain file again before the next poll (0.2 s away), which would block once more.
        (root / "loadavg").unlink()
        (root / "loadavg").write_text("0.1 0.2 0.3 1/1 1\n")
        poller.stop()
    assert value("kvm_load1") == 0.1  # the poll that was stuck completed


SYSTEM_DATA = {
    "kvm_processes",
    "kvm_threads",
    "kvm_processes_folded_groups",
    "kvm_load1",
    "kvm_load5",
    "kvm_load15",
    "kvm_swap_size_bytes",
    "kvm_swap_used_bytes",
    "kvm_cpus",
    "kvm_processes_limit",
    "kvm_threads_limit",
    "kvm_memory_total_bytes",
    "kvm_group_processes",
    "kvm_resident_memory_bytes",
    "kvm_virtual_memory_bytes",
    "kvm_resource_folded_groups",
    "kvm_jail_info",
    "kvm_host_cpu_seconds",
    "kvm_host_page_faults",
    "kvm_forks",
}
"""The families read from the system: their HELP says the value is as of the last poll."""
HOST_COUNTERS = {"kvm_host_cpu_seconds", "kvm_host_page_faults", "kvm_forks"}
"""The kernel's own counters: since boot, not since the exporter started."""


def test_help_texts_follow_one_style(fixture_root: Path) -> None:
    """One sentence each; system data 'as of the last poll', counters 'since the exporter
    started', 0/1 gauges 'else 0', units named for seconds and bytes."""
    _, registry = polled(fixture_root)
    helps = {m.name: m.documentation for m in registry.collect() if m.name.startswith("kvm_")}
    assert set(helps) >= SYSTEM_DATA
    for name, text in helps.items():
        assert text[0].isupper() or text[0].isdigit(), name
        assert text.endswith(".") and text.count(". ") == 0, f"{name}: {text!r}"
        assert text.endswith(", as of the last poll.") == (name in SYSTEM_DATA), name
        metric = next(m for m in registry.collect() if m.name == name)
        counted = text.endswith(" since the exporter started.") or name in HOST_COUNTERS
        assert counted == (metric.type == "counter"), name
        if text.startswith("1 if "):
            assert text.endswith(", else 0."), name
        if name.endswith("_timestamp_seconds"):
            assert text.startswith("Unix time in seconds "), name
        elif name.endswith("_seconds"):
            assert "Seconds" in text, name
        if name.endswith("_bytes"):
            assert "bytes" in text.lower(), name


def test_no_help_text_doubles_its_punctuation_or_points_elsewhere(fixture_root: Path) -> None:
    """Every family, the compat names' and the named groups' too, where HELP texts are put
    together from parts: no "letter., as of", no "(README: ...)", no "1 minutes"."""
    rules = parse_process_names([{"name": "{{.Comm}}", "comm": ["sshd", "bash"]}])
    compat = ("node_exporter", "process_exporter")
    _, registry = polled(fixture_root, compat=compat, groups=rules)
    helps = {m.name: m.documentation for m in registry.collect()}
    assert {"kvm_load1", "kvm_cpu_seconds", "kvm_namegroup_cpu_seconds"} <= set(helps)
    assert {"node_processes_state", "namedprocess_namegroup_num_procs"} <= set(helps)
    for name, text in helps.items():
        assert not re.search(r"[.,;:] ?[.,;:]", text), f"{name}: {text!r}"
        assert "README" not in text, f"{name}: {text!r}"
        assert not re.search(r"\b1 [a-z]+s\b", text), f"{name}: {text!r}"


def test_once_with_interval_0_exits_by_the_poll_it_printed(
    fixture_root: Path, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """``--once`` prints a poll and says by its exit status whether that poll succeeded: the
    status must not come from yet another poll (here one whose load average fails)."""
    from kvm_exporter import cli, service
    from kvm_exporter.config import parse_config
    from kvm_exporter.records import LoadAvg, SourceError

    reads: list[int] = []

    class LoadFailsLater(ProcfsSource):
        def loadavg(self) -> LoadAvg:
            reads.append(1)
            if len(reads) > 2:
                raise SourceError("loadavg: gone")
            return super().loadavg()

    source = LoadFailsLater(str(fixture_root))
    config = parse_config("interval: 0\n")
    monkeypatch.setattr(service, "prepare", lambda *_: (config, None, source))
    status = cli.once(cli.build_parser().parse_args(["--once"]))
    assert b"\nkvm_up 1.0\n" in capsysbinary.readouterr().out
    assert status == 0
