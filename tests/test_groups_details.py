"""``groups.details``: what more is read of each named process (Linux ``PID/io``, ``PID/fd``
and ``limits``, ``status``, ``smaps_rollup``), per group, under our names and
process-exporter's; compared with what /proc says and with the real process-exporter
(Debian's ``prometheus-process-exporter``) on the same config and processes."""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from conftest import free_port, listens, samples, wait_until
from fakelib import SCENARIOS, fake_libkvm  # noqa: F401 (fixture)
from test_groups import SPEC, Argvs, proc, rules
from test_groups_process_exporter import by_group, scrape
from test_live_leader import leader  # noqa: F401 (fixture)

from kvm_exporter.groups.families import GroupCollector
from kvm_exporter.groups.tracker import Grouper
from kvm_exporter.poller import Poller, Settings
from kvm_exporter.records import DETAILS, Details, Source, SourceError, Survey
from kvm_exporter.service import prepare
from kvm_exporter.sources.procfs import ProcfsSource
from kvm_exporter.visibility import mount_of

# --- how the groups count details: a reader the test answers for --------------------------


class Reader:
    """A source's details(): answers from a table (None: gone) and records what it read."""

    def __init__(self) -> None:
        self.table: dict[int, Details | None] = {}
        self.reads: list[int] = []

    def __call__(self, pid: int, wanted: Any) -> Details | None:
        self.reads.append(pid)
        return self.table.get(pid)


def test_details_are_read_for_named_processes_only_and_counters_never_go_back() -> None:
    reader = Reader()
    wanted = ("io", "fd", "status")
    grouper = Grouper(rules({"name": "web", "comm": ["a"]}), True, 100, Argvs({}), str, SPEC,
                      details=(reader, wanted))  # fmt: skip
    reader.table = {
        2: Details(write_bytes=100, open_fds=3, fd_ratio=0.03, voluntary_switches=5),
        3: Details(write_bytes=900, open_fds=5, fd_ratio=0.5, swap_bytes=4096),
    }
    procs = [proc(2, 1, "a"), proc(3, 1, "a"), proc(4, 1, "c")]
    got = grouper.update(Survey({}, procs, 10)).details
    assert got is not None and sorted(reader.reads) == [2, 3]  # pid 4 is in no group
    assert got.gauges == {
        "open_fds": {"web": 8},
        "fd_ratio": {"web": 0.5},  # the worst, not a sum
        "swap_bytes": {"web": 4096},
    }
    write, voluntary = ("io_bytes", "write"), ("context_switches", "voluntary")
    assert got.counters[write] == {"web": 0} and got.counters[voluntary] == {"web": 0}  # baseline
    # pid 3's io is refused this poll, its status too: left out of their counters, counted.
    reader.table[2] = Details(write_bytes=150, voluntary_switches=7)
    reader.table[3] = Details(write_bytes=0, refused=("io", "status"))
    got = grouper.update(Survey({}, procs, 20)).details
    assert got is not None
    assert got.counters[write] == {"web": 50} and got.counters[voluntary] == {"web": 2}
    assert (got.procread_errors, got.partial_errors) == (1, 1)
    assert got.refused == {"io": 1, "fd": 0, "limits": 0, "status": 1}
    # pid 3 readable again: a baseline, not its whole past at once. pid 2 exits and a new
    # process started since the last poll takes its pid: all it did counts, nothing of the
    # old one's 150 bytes is taken off. A process gone before its read is no error.
    reader.table[2] = Details(write_bytes=7)
    reader.table[3] = Details(write_bytes=1000)
    procs = [proc(2, 1, "a", start=25), proc(3, 1, "a"), proc(5, 1, "a")]
    got = grouper.update(Survey({}, procs, 30)).details
    assert got is not None
    assert got.counters[write] == {"web": 57}
    assert got.counters[voluntary] == {"web": 2}
    assert (got.procread_errors, got.partial_errors) == (1, 1)
    # Every process gone: the group stays, its gauges 0, its counters at their totals.
    got = grouper.update(Survey({}, [proc(4, 1, "c")], 40)).details
    assert got is not None
    assert got.gauges["open_fds"] == {"web": 0} and got.counters[write] == {"web": 57}


def test_a_thread_gone_takes_nothing_off_the_groups_other_processes() -> None:
    """A process's switches are its live threads' sum, which drops when a thread exits: the
    drop is taken off neither the group's other processes nor the process's next polls (what
    its other threads did in that interval is lost: the sum tells it from the drop no more)."""
    reader = Reader()
    grouper = Grouper(rules({"name": "web", "comm": ["a"]}), True, 100, Argvs({}), str, SPEC,
                      details=(reader, ("status",)))  # fmt: skip
    procs = [proc(2, 1, "a", threads=3), proc(3, 1, "a")]
    voluntary = ("context_switches", "voluntary")

    def poll(clock: int, two: int, three: int) -> float:
        reader.table = {2: Details(voluntary_switches=two), 3: Details(voluntary_switches=three)}
        got = grouper.update(Survey({}, procs, clock)).details
        assert got is not None
        return got.counters[voluntary]["web"]

    assert poll(10, 1000, 0) == 0  # a baseline
    assert poll(20, 1100, 50) == 150
    # A thread of pid 2 with 900 switches exits and its others switch 40: the sum drops 860.
    assert poll(30, 240, 110) == 150 + 60  # pid 3's 60 all the same (none before the fix)
    assert poll(40, 250, 110) == 150 + 60 + 10  # pid 2 goes on from 240


# --- live: real processes, the exporter, /proc and the real process-exporter ---------------

PROCESS_EXPORTER = "/usr/bin/prometheus-process-exporter"

CHILD = """
import os, resource, sys, threading, time
go, done = threading.Semaphore(0), threading.Semaphore(0)


def switcher():  # a second thread: 50 short sleeps, 50 voluntary switches, when told
    while go.acquire():
        for _ in range(50):
            time.sleep(0.001)
        done.release()


threading.Thread(target=switcher, daemon=True).start()
soft = int(sys.argv[sys.argv.index("--nofile") + 1])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
held = [open(os.devnull) for _ in range(int(sys.argv[sys.argv.index("--files") + 1]))]
print("ready", flush=True)
for line in sys.stdin:
    what, path, size = line.split()
    if what == "switch":
        go.release()
        done.acquire()
    elif what == "write":  # to storage: written, synced, then dropped from the page cache
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.write(fd, b"x" * int(size))
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    else:  # read back from storage (not in the page cache any more)
        fd = os.open(path, os.O_RDONLY)
        while os.read(fd, 65536):
            pass
        os.close(fd)
    print("done", flush=True)
"""

MIB = 1 << 20


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Path]:
    """A directory of the test's own where writes reach a block device (``read_bytes`` and
    ``write_bytes`` count storage I/O only, so a tmpfs ``/tmp`` would show none)."""
    for where in (tmp_path, Path("/var/tmp"), Path(__file__).resolve().parent):
        mount = mount_of(str(where.resolve()), Path("/proc/self/mountinfo").read_text())
        if mount is not None and mount[1] not in ("tmpfs", "ramfs"):
            made = Path(tempfile.mkdtemp(prefix="kvm-details-", dir=where))
            yield made
            shutil.rmtree(made, ignore_errors=True)
            return
    raise AssertionError("no directory on storage: /tmp, /var/tmp and tests/ are all in memory")


class Child:
    """One of the test's processes, of two threads: holds ``files`` descriptors under a soft
    limit of ``nofile``, and writes or reads a file, or has its second thread switch, when
    told."""

    def __init__(self, script: Path, nofile: int, files: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(script), "--nofile", str(nofile), "--files", str(files)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.nofile = nofile
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"

    def do(self, what: str, path: Path, size: int) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{what} {path} {size}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline() == "done\n"

    def proc_file(self, name: str) -> dict[str, int]:
        """The ``key: number`` lines of ``/proc/PID/name``."""
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/{name}").read_text().splitlines():
            key, _, value = line.partition(":")
            if value.split() and value.split()[0].isdigit():
                out[key] = int(value.split()[0])
        return out

    def switches(self) -> int:
        """Voluntary context switches of its threads (each thread's status counts its own)."""
        return sum(map(self.status_switches, Path(f"/proc/{self.proc.pid}/task").glob("*/status")))

    @staticmethod
    def status_switches(status: Path) -> int:
        """The voluntary context switches a ``status`` file gives."""
        for line in status.read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
        raise AssertionError(f"no voluntary_ctxt_switches in {status}")

    def blocked(self) -> bool:
        """Whether its threads sleep, waiting for the next line: its counters stand still."""
        states = []
        for stat in Path(f"/proc/{self.proc.pid}/task").glob("*/stat"):
            text = stat.read_text()
            states.append(text[text.rindex(")") + 2])
        return states == ["S", "S"]

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))


@pytest.fixture
def children(tmp_path: Path) -> Iterator[tuple[str, list[Child]]]:
    """Two processes of one group no other process on the host falls into: (token, them)."""
    token = "d" + secrets.token_hex(4)
    script = tmp_path / f"{token}.py"
    script.write_text(CHILD)
    started = []
    try:
        started.append(Child(script, nofile=100, files=40))
        started.append(Child(script, nofile=4000, files=3))
        yield token, started
    finally:
        for child in started:
            child.proc.kill()
            child.proc.wait()


@pytest.fixture
def process_exporter(tmp_path: Path) -> Iterator[Any]:
    """The real process-exporter with -gather-smaps, on a free loopback port."""
    running: list[subprocess.Popen[Any]] = []

    def start(config_path: Path) -> str:
        port = free_port()
        log = open(tmp_path / f"pe-{port}.log", "wb")  # noqa: SIM115 - closed with it
        running.append(
            subprocess.Popen(
                [
                    PROCESS_EXPORTER,
                    f"-config.path={config_path}",
                    f"-web.listen-address=127.0.0.1:{port}",
                    "-threads=true",  # its default: context switches summed over threads
                    "-gather-smaps=true",
                ],
                stdout=log,
                stderr=log,
            )
        )
        wait_until(lambda: listens(running[-1].pid, port), timeout=120, what="process-exporter")
        return f"http://127.0.0.1:{port}/metrics"

    yield start
    for p in running:
        p.terminate()
        p.wait(timeout=10)


def help_and_type(text: str) -> dict[str, tuple[str, str]]:
    """Each family's (HELP, TYPE) as the exposition writes them, by name."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith(("# HELP ", "# TYPE ")):
            _, kind, name, *rest = line.split(" ", 3)
            out.setdefault(name, ["", ""])[kind == "TYPE"] = rest[0] if rest else ""
    return {name: (doc, kind) for name, (doc, kind) in out.items()}


def test_details_equal_proc_and_the_real_process_exporters(
    exporter: Any,
    process_exporter: Any,
    children: tuple[str, list[Child]],
    tmp_path: Path,
    storage: Path,
) -> None:
    token, (many, few) = children
    group = f"io-{token}"
    config = tmp_path / "process-exporter.yml"
    config.write_text(f"process_names:\n  - name: {group}\n    cmdline: ['{token}\\.py']\n")
    ours = exporter(
        "interval: 0\ncompat: [process_exporter]\n"
        f"groups:\n  config_file: {config}\n  details: [io, fd, status, smaps]\n"
    )
    theirs = process_exporter(config)

    def both() -> tuple[dict[Any, float], dict[Any, float]]:
        return ours.metrics(), scrape(theirs)

    kvm, pe = both()
    fds = many.open_fds() + few.open_fds()
    assert fds >= 40 + 3
    for metrics, name in (
        (kvm, "kvm_namegroup_open_fds"),
        (kvm, "namedprocess_namegroup_open_filedesc"),
        (pe, "namedprocess_namegroup_open_filedesc"),
    ):
        assert by_group(metrics, name)[group] == fds, name
    worst = many.open_fds() / many.nofile  # 40-odd of 100 against 6-odd of 4000
    for metrics, name in (
        (kvm, "kvm_namegroup_worst_fd_ratio"),
        (kvm, "namedprocess_namegroup_worst_fd_ratio"),
        (pe, "namedprocess_namegroup_worst_fd_ratio"),
    ):
        assert by_group(metrics, name)[group] == pytest.approx(worst), name
    memory = "namedprocess_namegroup_memory_bytes"
    swapped = sum(c.proc_file("status").get("VmSwap", 0) * 1024 for c in (many, few))
    assert by_group(pe, memory, memtype="swapped")[group] == swapped
    # No swap is set up here, so 0 on both (the test cannot make the kernel swap a page out).
    assert by_group(kvm, memory, memtype="swapped")[group] == swapped
    assert by_group(kvm, "kvm_namegroup_swapped_memory_bytes")[group] == swapped
    for memtype, key in (("proportionalResident", "Pss"), ("proportionalSwapped", "SwapPss")):
        on_proc = sum(c.proc_file("smaps_rollup").get(key, 0) * 1024 for c in (many, few))
        # Pss moves as other processes map and unmap the same pages (Python's own library).
        assert by_group(kvm, memory, memtype=memtype)[group] == pytest.approx(on_proc, rel=0.1)
        assert by_group(pe, memory, memtype=memtype)[group] == pytest.approx(on_proc, rel=0.1)

    # Counters: what each exporter's grew by over known I/O and switches, against /proc's.
    def counters(kvm: dict[Any, float], pe: dict[Any, float]) -> dict[str, tuple[float, float]]:
        ctx = "namedprocess_namegroup_context_switches_total"
        return {
            "write_bytes": (
                by_group(kvm, "kvm_namegroup_io_bytes_total", direction="write")[group],
                by_group(pe, "namedprocess_namegroup_write_bytes_total")[group],
            ),
            "read_bytes": (
                by_group(kvm, "namedprocess_namegroup_read_bytes_total")[group],
                by_group(pe, "namedprocess_namegroup_read_bytes_total")[group],
            ),
            "voluntary_ctxt_switches": (
                by_group(kvm, ctx, ctxswitchtype="voluntary")[group],
                by_group(pe, ctx, ctxswitchtype="voluntary")[group],
            ),
        }

    def on_proc() -> dict[str, int]:
        """The children's counters once both wait for a line (one that has just answered
        may switch once more on its way to the next read)."""
        wait_until(lambda: many.blocked() and few.blocked(), what="the children to wait")
        total: dict[str, int] = {}
        for child in (many, few):
            for key, value in child.proc_file("io").items():
                total[key] = total.get(key, 0) + value
        total["voluntary_ctxt_switches"] = many.switches() + few.switches()
        return total

    proc_before, before = on_proc(), counters(*both())
    data = storage / "data"
    many.do("write", data, 4 * MIB)
    few.do("read", data, 4 * MIB)
    many.do("switch", data, 0)
    proc_after, after = on_proc(), counters(*both())
    grew = {key: proc_after[key] - proc_before[key] for key in before}
    assert grew["write_bytes"] >= 4 * MIB and grew["read_bytes"] >= 4 * MIB  # storage I/O
    assert grew["voluntary_ctxt_switches"] >= 50  # the second thread's, and the first's
    for key, (kvm_then, pe_then) in before.items():
        kvm_now, pe_now = after[key]
        assert (kvm_now - kvm_then, pe_now - pe_then) == (grew[key], grew[key]), key
    kvm_text = ours.get()
    with urllib.request.urlopen(theirs, timeout=120) as response:
        pe_families = help_and_type(response.read().decode())
    kvm_families = help_and_type(kvm_text)
    # Ours say "as of the last poll" after process-exporter's HELP on a gauge, as all do.
    for name in (
        "namedprocess_namegroup_open_filedesc",
        "namedprocess_namegroup_worst_fd_ratio",
        "namedprocess_namegroup_read_bytes_total",
        "namedprocess_namegroup_write_bytes_total",
        "namedprocess_namegroup_context_switches_total",
    ):
        doc, kind = kvm_families[name]
        assert doc.startswith(pe_families[name][0]) and kind == pe_families[name][1], name
    for name in (
        "namedprocess_scrape_errors",
        "namedprocess_scrape_procread_errors",
        "namedprocess_scrape_partial_errors",
    ):
        assert kvm_families[name] == (pe_families[name][0], "untyped"), name
        assert samples(kvm_text)[name, frozenset()] == 0  # root reads every file


def test_another_users_files_refused_are_counted_and_never_fail_the_poll(
    children: tuple[str, list[Child]],
) -> None:
    """The exporter as nobody, the processes root's: ``io`` and ``smaps_rollup`` are refused
    (ptrace access), counted once per process and poll; ``status``, ``limits`` and the
    count of open descriptors (the size of ``PID/fd``) are anyone's."""
    token, (many, few) = children
    folder = Path(tempfile.mkdtemp(prefix="kvm-details-"))  # nobody reads the config there
    try:
        folder.chmod(0o755)
        config = folder / "kvm_exporter.yml"
        config.write_text(
            "interval: 0\ncompat: [process_exporter]\ngroups:\n"
            f"  process_names: [{{name: g, cmdline: ['{token}\\.py']}}]\n"
            "  details: [io, fd, status, smaps]\n"
        )
        config.chmod(0o644)
        port = free_port()
        exporter = subprocess.Popen(
            [sys.executable, "-m", "kvm_exporter", f"--config.file={config}",
             f"--web.listen-address=127.0.0.1:{port}"],
            user=65534, group=65534, extra_groups=[], cwd="/", stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_until(lambda: listens(exporter.pid, port), what="exporter as nobody")
            url = f"http://127.0.0.1:{port}/metrics"
            first, second = scrape(url), scrape(url)  # a poll each (interval 0)
        finally:
            exporter.terminate()
            exporter.wait(timeout=10)
    finally:
        shutil.rmtree(folder)
    partial = ("namedprocess_scrape_partial_errors", frozenset())
    assert second[partial] - first[partial] == 2  # two processes, one poll
    assert second["namedprocess_scrape_procread_errors", frozenset()] == 0
    refused = {
        dict(key)["file"]: value
        for (name, key), value in second.items()
        if name == "kvm_namegroup_details_refused_total"
    }
    assert refused["io"] == refused["smaps_rollup"] == second[partial]
    assert refused["fd"] == refused["limits"] == refused["status"] == 0
    fds = many.open_fds() + few.open_fds()
    assert by_group(second, "namedprocess_namegroup_open_filedesc")["g"] == fds
    assert by_group(second, "kvm_namegroup_io_bytes_total", direction="write")["g"] == 0


def test_details_on_a_source_that_reads_none_is_one_clear_error(
    fake_libkvm: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_KVM_SCENARIO", str(SCENARIOS / "web01.scenario"))
    config = tmp_path / "kvm_exporter.yml"
    config.write_text(
        f"source: libkvm\nlibkvm: {{library: {fake_libkvm}}}\ngroups: {{details: [status]}}\n"
    )
    with pytest.raises(SourceError) as err:
        prepare(str(config), {})
    assert str(err.value) == (
        "groups.details: the libkvm source reads no details of processes (only procfs does,"
        " on Linux)"
    )


def test_a_zombie_has_no_memory_to_read_and_a_reaped_process_is_gone(tmp_path: Path) -> None:
    """``smaps_rollup`` of a process without memory (a zombie, a kernel thread) says ESRCH:
    no memory, not an error; ``status`` has no ``VmSwap`` line there. A process reaped
    before its read is None (gone), whatever was asked."""
    source = ProcfsSource()
    child = subprocess.Popen(["true"])
    wait_until(lambda: Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1][0] == "Z")
    try:
        zombie = source.details(child.pid, DETAILS)
        assert zombie is not None and zombie.refused == ()
        assert (zombie.proportional_bytes, zombie.swap_bytes, zombie.open_fds) == (0, 0, 0)
    finally:
        child.wait()
    assert source.details(child.pid, DETAILS) is None
    alive = source.details(os.getpid(), DETAILS)
    assert alive is not None and alive.open_fds == len(os.listdir("/proc/self/fd")) - 1
    assert alive.proportional_bytes > 0 and alive.voluntary_switches + alive.involuntary_switches


class FailingOnce:
    """The procfs source, whose next survey fails once (a /proc that could not be listed)."""

    def __init__(self) -> None:
        self._source = ProcfsSource()
        self.fail = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)

    def survey(self) -> Any:
        if self.fail:
            self.fail = False
            raise SourceError("cannot list /proc: Input/output error")
        return self._source.survey()


def served_scrape_errors(poller: Poller) -> dict[str, float]:
    """The ``namedprocess_scrape_*`` values a scrape gets, by name."""
    return {
        family.name: family.samples[0].value
        for family in GroupCollector(poller).collect()
        if family.name.startswith("namedprocess_scrape_")
    }


def test_scrape_errors_count_the_polls_whose_processes_could_not_be_read() -> None:
    source = FailingOnce()
    settings = Settings(
        groups=rules({"name": "me", "cmdline": ["."]}), compat=("process_exporter",)
    )
    poller = Poller(cast(Source, source), settings)
    scrape_errors = functools.partial(served_scrape_errors, poller)
    poller.poll()
    assert scrape_errors() == dict.fromkeys(
        ("namedprocess_scrape_errors", "namedprocess_scrape_procread_errors",
         "namedprocess_scrape_partial_errors"), 0,
    )  # fmt: skip
    source.fail = True
    poller.poll()  # no groups this poll: the scrape counters are still served
    assert scrape_errors()["namedprocess_scrape_errors"] == 1
    poller.poll()
    assert scrape_errors()["namedprocess_scrape_errors"] == 1


class Refusing(FailingOnce):
    """:class:`FailingOnce` whose details reads are all refused ``io``."""

    def details(self, pid: int, wanted: Any) -> Details | None:
        found = self._source.details(pid, wanted)
        return None if found is None else found._replace(refused=("io",))


def test_a_poll_that_fails_serves_no_refusals_rather_than_none() -> None:
    """A poll without groups has no details: the count of refused reads so far is not 0
    then (a rate() over that dip and back would see the whole count again)."""
    source = Refusing()
    settings = Settings(groups=rules({"name": "me", "cmdline": ["."]}), details=("io",),
                        compat=("process_exporter",))  # fmt: skip
    poller = Poller(cast(Source, source), settings)
    partial = "namedprocess_scrape_partial_errors"
    served = functools.partial(served_scrape_errors, poller)
    poller.poll()
    refused = served()[partial]
    assert refused >= 1  # this process at least
    source.fail = True
    poller.poll()
    assert served()["namedprocess_scrape_errors"] == 1 and partial not in served()
    poller.poll()
    assert served()[partial] > refused  # this process's refusal again at least


def test_a_process_whose_first_thread_exited_counts_its_live_threads_switches(
    leader: subprocess.Popen[bytes],  # noqa: F811
) -> None:
    """``pthread_exit`` in main: the first thread is a zombie whose ``status`` counts only its
    own switches, frozen, while the second runs on (the zombie still counts in ``Threads:``,
    so both are summed). Stopped, the second thread has switched at least once more (into
    the stop): the process's switches are both threads'."""
    os.kill(leader.pid, signal.SIGSTOP)
    try:
        task = Path(f"/proc/{leader.pid}/task")
        wait_until(
            lambda: all("State:\tT" in (task / tid / "status").read_text() for tid in
                        os.listdir(task) if tid != str(leader.pid)),
            what="the live thread to stop",
        )  # fmt: skip
        per_thread = {
            tid: Child.status_switches(Path(f"/proc/{leader.pid}/task/{tid}/status"))
            for tid in os.listdir(f"/proc/{leader.pid}/task")
        }
        details = ProcfsSource().details(leader.pid, ("status",))
    finally:
        os.kill(leader.pid, signal.SIGCONT)
    assert len(per_thread) == 2 and details is not None
    assert details.voluntary_switches == sum(per_thread.values())
    assert details.voluntary_switches > per_thread[str(leader.pid)]  # the zombie's own


def test_sighup_turns_details_on_and_off(exporter: Any, children: tuple[str, list[Child]]) -> None:
    token, _ = children
    rules = f"  process_names: [{{name: g, cmdline: ['{token}\\.py']}}]\n"
    e = exporter(f"interval: 1s\ngroups:\n{rules}")
    assert 'kvm_namegroup_processes{group="g"} 2.0' in e.get()
    assert "kvm_namegroup_open_fds" not in e.get()
    for details, served in (("[fd]", True), ("[]", False)):
        e.config_path.write_text(f"interval: 1s\ngroups:\n{rules}  details: {details}\n")
        e.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda served=served: ('kvm_namegroup_open_fds{group="g"}' in e.get()) == served,
            what=f"details served: {served}",
        )
    assert e.proc.poll() is None
