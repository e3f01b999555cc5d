"""Named groups (issue 14) beside process-exporter, same config, same run.

Starts N idle processes (``../shared/bench/idlekids.c``), then measures, with process-exporter's
``pe-comm.yml`` (one group per comm, every process, kernel threads included) for both:

- in-process, the way ``floor.c`` times itself (median CPU of ``--polls`` polls): a whole
  ``Poller.poll()`` with groups at steady state (every process already named), the same with
  10% of the processes new at each poll (``cputime.Churn``: their records' start moved, as
  if each pid had been reused, so the poll names them and reads their arguments), the first
  poll (every process new), and a poll without groups; and ``floor`` (stat + stat() per pid,
  what a poll reads) as the C floor, in the same round: ``--rounds`` rounds alternate the
  two, so a change of the machine's load shows in both;
- as processes: process-exporter (``-threads=false -gather-smaps=false``, its leanest) and
  kvm_exporter with ``interval: 0`` (a poll per scrape), each scraped ``--scrapes`` times;
  CPU per scrape = utime+stime of the process over the scrapes; RSS after.

Prints one JSON object. Usage:
python bench/groups.py [--n 10000] [--polls 10] [--scrapes 5] [--rounds 3] [--no-resources]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cputime import as_the_service, group_poll_costs

from kvm_exporter.config import load_config
from kvm_exporter.poller import Settings
from kvm_exporter.sources.procfs import ProcfsSource

SHARED = Path(
    os.environ.get(
        "SHARED_BENCH", Path(__file__).resolve().parent.parent.parent / "shared" / "bench"
    )
)
"""``../shared/bench`` from the repository, as in ``run.sh``."""
CLK_TCK = os.sysconf("SC_CLK_TCK")


def build(tmp: Path, name: str) -> str:
    out = tmp / name
    subprocess.run(["cc", "-O2", "-o", str(out), str(SHARED / f"{name}.c")], check=True)
    return str(out)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape_cpu(cmd: list[str], port: int, scrapes: int) -> dict[str, float]:
    """CPU per scrape (ms) and RSS (MiB) of the exporter ``cmd`` listening on ``port``."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url, timeout=60).read()  # the first scrape: warm-up
                break
            except OSError:
                time.sleep(0.1)
        urllib.request.urlopen(url, timeout=60).read()
        before = cpu_seconds(proc.pid)
        for _ in range(scrapes):
            urllib.request.urlopen(url, timeout=60).read()
        per_scrape = (cpu_seconds(proc.pid) - before) / scrapes
        return {"cpu_ms": round(per_scrape * 1000, 1), "rss_mib": rss_mib(proc.pid)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def process_exporter(config: Path, port: int, smaps: bool = False) -> list[str]:
    """process-exporter's command line on ``port``, threads off (its leanest)."""
    return [
        "/usr/bin/prometheus-process-exporter",
        f"-config.path={config}",
        f"-web.listen-address=127.0.0.1:{port}",
        "-threads=false",
        f"-gather-smaps={str(smaps).lower()}",
    ]


def kvm_exporter(config: Path, port: int) -> list[str]:
    """kvm_exporter's command line (this venv's) on ``port``."""
    return [
        str(Path(sys.executable).with_name("kvm_exporter")),
        f"--config.file={config}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]


@contextmanager
def idle_processes(tmp: Path, n: int) -> Iterator[None]:
    """``n`` idle processes (``idlekids``; as root half uid 0, half 65534) while inside."""
    idle = build(tmp, "idlekids")
    uids = "0,65534" if os.getuid() == 0 else str(os.getuid())
    kids = subprocess.Popen(
        [idle, str(n), str(tmp / "pids"), "1800", uids], stdout=subprocess.PIPE, text=True
    )
    try:
        assert kids.stdout is not None and kids.stdout.readline().startswith("ready")
        yield
    finally:
        kids.terminate()
        kids.wait(timeout=60)


def floor(binary: str) -> float:
    out = subprocess.run([binary, "20"], capture_output=True, text=True, check=True)
    values = dict(kv.split("=") for kv in out.stdout.split())
    return float(values["cpu_med_ms"])


def in_process(config: Path, polls: int, resources: bool) -> dict[str, float]:
    rules = load_config(str(config)).groups.process_names
    settings = Settings(groups=rules, resources=("user",) if resources else None)
    return group_poll_costs(ProcfsSource(), settings, polls)


def rounds(binary: str, config: Path, args: argparse.Namespace) -> dict[str, object]:
    """The C floor and the in-process polls, alternated ``args.rounds`` times."""
    each = []
    for _ in range(args.rounds):
        floor_ms = floor(binary)
        costs = in_process(config, args.polls, args.resources)
        ratio = costs["steady_poll_cpu_ms"] / floor_ms
        each.append({"floor_stat_cpu_ms": floor_ms, **costs, "steady_over_floor": round(ratio, 3)})
    ratios = sorted(r["steady_over_floor"] for r in each)
    return {"rounds": each, "steady_over_floor_median": ratios[len(ratios) // 2]}


def arguments(doc: str | None) -> argparse.ArgumentParser:
    """The settings both group benches take: processes, polls, scrapes, rounds."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--polls", type=int, default=10)
    parser.add_argument("--scrapes", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    return parser


def main() -> None:
    as_the_service()
    parser = arguments(__doc__)
    parser.add_argument(
        "--no-resources", dest="resources", action="store_false", help="groups alone"
    )
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kvm-groups-bench."))
    pe_config = tmp / "pe-comm.yml"
    shutil.copy(SHARED / "pe-comm.yml", pe_config)
    kvm_config = tmp / "kvm.yml"
    resources = "" if args.resources else "resources:\n  enabled: false\n"
    kvm_config.write_text(f"interval: 0\ngroups:\n  config_file: {pe_config}\n{resources}")
    floor_bin = build(tmp, "floor")
    try:
        with idle_processes(tmp, args.n):
            result: dict[str, object] = {"n": args.n, "load1_before": os.getloadavg()[0]}
            result.update(rounds(floor_bin, kvm_config, args))
            port = free_port()
            pe = process_exporter(pe_config, port)
            result["process_exporter"] = scrape_cpu(pe, port, args.scrapes)
            port = free_port()
            kvm = kvm_exporter(kvm_config, port)
            result["kvm_exporter_scrape0"] = scrape_cpu(kvm, port, args.scrapes)
            result["load1_after"] = os.getloadavg()[0]
            print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
