"""FreeBSD path of the named groups: 10,000 processes through the fake libkvm of the tests.

A generated scenario (``freebsd_aggregate.scenario``, plus an ``argv`` per process: 50
programs, each with a ``--pool=`` argument) and process-exporter's ``cmdline`` catch-all with
a capture. Prints one JSON object, median CPU in milliseconds of a whole ``Poller.poll()``:
the first poll (every process new: one ``kvm_getargv`` each), a steady-state poll (no
``kvm_getargv`` at all), one with 10% of the processes new (``cputime.Churn``: their
records' start moved, as if each pid had been reused), and a poll without groups (the
census).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

from cputime import as_the_service, group_poll_costs
from freebsd_aggregate import TESTS, scenario

from kvm_exporter.config import LibkvmConfig, parse_config
from kvm_exporter.poller import Settings
from kvm_exporter.sources.libkvm import LibkvmSource

RULES = """groups:
  process_names:
    - name: "{{.ExeBase}}-{{.Matches.pool}}"
      cmdline: ['--pool=(?P<pool>\\w+)']
"""


def with_argv(text: str) -> str:
    out = ["sysctl hw.ncpu 4", "sysctl kern.maxproc 200000", "sysctl kern.maxthread 200000"]
    for line in text.splitlines():
        if line.startswith("proc "):
            pid = int(line.split("pid=")[1].split()[0])
            line += f" argv=/usr/local/bin/p{pid % 50}|--pool=pool{pid % 7}|--verbose"
        out.append(line)
    return "\n".join(out) + "\n"


def main() -> None:
    as_the_service()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--polls", type=int, default=7)
    args = parser.parse_args()
    sys.path.insert(0, str(TESTS))
    from fakelib import build_fake_libkvm

    with tempfile.TemporaryDirectory(prefix="kvm-bench-") as tmp:
        library = build_fake_libkvm(pathlib.Path(tmp))
        path = pathlib.Path(tmp, "groups.scenario")
        path.write_text(with_argv(scenario(2, args.n)))
        os.environ["FAKE_KVM_SCENARIO"] = str(path)
        source = LibkvmSource(LibkvmConfig(library=str(library)))
        rules = parse_config(RULES).groups.process_names
        try:
            print(json.dumps(group_poll_costs(source, Settings(groups=rules), args.polls)))
        finally:
            source.close()


if __name__ == "__main__":
    main()
