"""Print the tables of a bench/run.sh output folder (markdown), with kvm_exporter's ratios."""

from __future__ import annotations

import csv
import json
import pathlib
import re
import sys

KVM = "kvm_scrape0"


def peers_table(out: pathlib.Path) -> list[str]:
    path = out / "peers" / "results.tsv"
    if not path.exists():
        return ["(no peers.sh results)"]
    rows = list(csv.DictReader(path.open(), delimiter="\t"))
    lines = [
        "CPU per scrape (exporters) or per pass (floor, ps); kvm_scrape0 collects on every scrape.",
        "",
        "| N | tool | CPU ms | wall median ms | wall p95 ms | RSS MiB | kvm_scrape0 CPU ÷ this |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for n in dict.fromkeys(r["N"] for r in rows):
        group = [r for r in rows if r["N"] == n]
        ours = next((float(r["cpu_ms_per_scrape"]) for r in group if r["tool"] == KVM), None)
        for r in group:
            cpu = r["cpu_ms_per_scrape"]
            ratio = f"{ours / float(cpu):.2f}" if ours and cpu not in ("NA", "0.000") else ""
            rss = "" if r["rss_mib"] == "NA" else r["rss_mib"]
            lines.append(
                f"| {n} | {r['tool']} | {cpu} | {r['wall_med_ms']} | {r['wall_p95_ms']} "
                f"| {rss} | {ratio} |"
            )
    return lines


def floor_cpu(path: pathlib.Path) -> tuple[float, float]:
    status, stat = (float(re.search(r"cpu_med_ms=(\S+)", line)[1]) for line in path.open())  # type: ignore[index]
    return status, stat


def phase2_table(out: pathlib.Path) -> list[str]:
    lines = [
        "In-process CPU per poll (median of 20, like floor.c) and /metrics latency on the",
        "default 15 s interval, wrk closed loop with 1 and 16 connections.",
        "",
        "| N | floor ms | poll ms | poll ÷ floor | poll, Python census ms | ÷ floor "
        "| floor -s ms | procs() ms | c=1 p50 / p99 ms | c=16 p50 / p99 ms | c=16 req/s "
        "| RSS MiB (peak) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for floor in sorted(out.glob("N*-floor.txt"), key=lambda p: int(p.name[1:].split("-")[0])):
        tag = floor.name.split("-")[0]
        status, stat = floor_cpu(floor)
        poll = json.loads((out / f"{tag}-poll.json").read_text())
        lat = json.loads((out / f"{tag}-kvm.latency.json").read_text())
        rss = dict(line.split() for line in (out / f"{tag}-kvm.rss").open())
        python = poll.get("poll_python_cpu_ms")  # runs before it was measured: absent
        python_cells = f"{python:.1f} | {python / stat:.2f}" if python else "n/a | n/a"
        lines.append(
            f"| {tag[1:]} | {stat:.1f} | {poll['poll_cpu_ms']:.1f} "
            f"| {poll['poll_cpu_ms'] / stat:.2f} | {python_cells} | {status:.1f} "
            f"| {poll['procs_cpu_ms']:.1f} "
            f"| {lat['1']['p50_ms']} / {lat['1']['p99_ms']} "
            f"| {lat['16']['p50_ms']} / {lat['16']['p99_ms']} | {lat['16']['rps']:.0f} "
            f"| {rss.get('VmRSS:', '?')} ({rss.get('VmHWM:', '?')}) |"
        )
    return lines


def freebsd_table(out: pathlib.Path) -> list[str]:
    path = out / "freebsd.jsonl"
    if not path.exists() or not path.read_text().strip():
        return ["(no FreeBSD-path results)"]
    lines = [
        "| kinfo_proc records | groups | kvm_getprocs ms | procs() ms | census() ms "
        "| census() + aggregate() ms | the same, warm names | records to counts ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for line in path.open():
        r = json.loads(line)
        lines.append(
            f"| {r['records']} | {r['groups']} | {r['getprocs_cpu_ms']} | {r['procs_cpu_ms']} "
            f"| {r['census_cpu_ms']} | {r['aggregate_cpu_ms']} "
            f"| {r['aggregate_warm_names_cpu_ms']} | {r['records_to_counts_cpu_ms']} |"
        )
    return lines


def main() -> None:
    out = pathlib.Path(sys.argv[1])
    for title, lines in (
        ("Phase 1: peers.sh, same run", peers_table(out)),
        ("Phase 2: poll CPU in-process, scrape latency, RSS", phase2_table(out)),
        ("Phase 3: FreeBSD path, fake libkvm", freebsd_table(out)),
    ):
        print(f"## {title}\n")
        print("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
