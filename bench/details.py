"""The named groups' details (``groups.details``, issue 21) beside process-exporter, same run.

Starts N idle processes (``../shared/bench/idlekids.c``, as ``groups.py``), all named by
process-exporter's ``pe-comm.yml`` (one group per comm, every process), and measures:

- in-process, a steady ``Poller.poll()`` with groups (median CPU of ``--polls`` polls after a
  first one) with no details, with each detail alone and with all four, alternated
  ``--rounds`` times so a change of the machine's load shows in every column;
- as processes: process-exporter (``-threads=false``) with ``-gather-smaps`` off and on,
  and kvm_exporter (``interval: 0``) without details and with all four, each scraped
  ``--scrapes`` times: CPU per scrape = utime+stime over the scrapes.

Prints one JSON object: each detail's cost is its poll less the poll without details.
Usage: python bench/details.py [--n 10000] [--polls 10] [--scrapes 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from cputime import as_the_service, median_ms
from groups import (
    SHARED,
    arguments,
    free_port,
    idle_processes,
    kvm_exporter,
    process_exporter,
    scrape_cpu,
)

from kvm_exporter.config import load_config
from kvm_exporter.poller import Poller, Settings
from kvm_exporter.records import DETAILS
from kvm_exporter.sources.procfs import ProcfsSource

CASES: dict[str, tuple[str, ...]] = {
    "none": (),
    **{detail: (detail,) for detail in DETAILS},
    "all": DETAILS,
}


def steady_poll_ms(config: Path, details: tuple[str, ...], polls: int) -> tuple[float, int]:
    """Median CPU of a steady poll with groups and ``details``; the processes grouped."""
    rules = load_config(str(config)).groups.process_names
    poller = Poller(ProcfsSource(), Settings(groups=rules, resources=None, details=details))
    poller.poll()  # the first: every process named
    cost = median_ms(poller.poll, polls)
    groups = poller.snapshot().groups
    assert groups is not None
    return cost, sum(groups.processes.values())


def main() -> None:
    as_the_service()
    args = arguments(__doc__).parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kvm-details-bench."))
    pe_config = tmp / "pe-comm.yml"
    shutil.copy(SHARED / "pe-comm.yml", pe_config)
    try:
        with idle_processes(tmp, args.n):
            print(json.dumps(measure(tmp, pe_config, args), indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure(tmp: Path, pe_config: Path, args: argparse.Namespace) -> dict[str, object]:
    """The in-process polls, then the exporters' scrapes, with the processes running."""
    result: dict[str, object] = {"n": args.n, "load1_before": os.getloadavg()[0]}
    kvm_rules = tmp / "kvm.yml"
    kvm_rules.write_text(f"groups:\n  config_file: {pe_config}\n")
    polls: dict[str, list[float]] = {case: [] for case in CASES}
    for _ in range(args.rounds):
        for case, details in CASES.items():
            cost, grouped = steady_poll_ms(kvm_rules, details, args.polls)
            polls[case].append(cost)
    result["grouped_processes"] = grouped
    median = {case: statistics.median(costs) for case, costs in polls.items()}
    result["steady_poll_cpu_ms"] = {case: round(ms, 1) for case, ms in median.items()}
    result["detail_cost_ms"] = {
        case: round(ms - median["none"], 1) for case, ms in median.items() if case != "none"
    }
    result["rounds"] = polls
    for smaps in (False, True):
        port = free_port()
        pe = process_exporter(pe_config, port, smaps)
        result[f"process_exporter_smaps_{smaps}"] = scrape_cpu(pe, port, args.scrapes)
    for case in ("none", "all"):
        config = tmp / f"kvm-{case}.yml"
        config.write_text(
            f"interval: 0\nresources: {{enabled: false}}\n"
            f"groups:\n  config_file: {pe_config}\n  details: [{', '.join(CASES[case])}]\n"
        )
        port = free_port()
        kvm = kvm_exporter(config, port)
        result[f"kvm_exporter_scrape0_details_{case}"] = scrape_cpu(kvm, port, args.scrapes)
    result["load1_after"] = os.getloadavg()[0]
    return result


if __name__ == "__main__":
    main()
