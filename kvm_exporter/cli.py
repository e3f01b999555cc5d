"""Command line: flags in the Prometheus family's style, then run, check or print once."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any

from prometheus_client import generate_latest

from . import memory
from .config import DEFAULT_PORT, FLAGS, LOG_FORMATS, LOG_LEVELS, ConfigError
from .logs import crash, setup
from .poller import Poller
from .records import SourceError
from .version import version_text

log = logging.getLogger("kvm_exporter")

HELP = {  # flag: (metavar, help)
    "web.listen-address": (
        "ADDRESS",
        f"address to listen on; repeat the flag to listen on several (default :{DEFAULT_PORT})",
    ),
    "web.telemetry-path": ("PATH", "path under which to expose metrics (default /metrics)"),
    "web.config.file": ("PATH", "exporter-toolkit web config file: TLS, basic auth, headers"),
    "poll.interval": (
        "DURATION",
        "time between polls, e.g. 15s, 1m30s, 500ms; 0 polls on every scrape (default 15s)",
    ),
    "collector.labels": (
        "LABELS",
        "comma-separated labels of kvm_processes and kvm_threads, from "
        "user,tty,state,jail (default user,tty,state)",
    ),
    "path.procfs": ("PATH", "procfs mount point, Linux (default /proc)"),
    "log.level": ("LEVEL", "one of " + ", ".join(LOG_LEVELS) + " (default info)"),
    "log.format": ("FORMAT", "one of " + ", ".join(LOG_FORMATS) + " (default logfmt)"),
    "libkvm.library": ("PATH", "path of libkvm to load (default libkvm.so.7)"),
    "libkvm.kernel": ("PATH", "kernel image of a crash dump (with --libkvm.core)"),
    "libkvm.core": ("PATH", "crash dump to read once: print its metrics and exit"),
    "libkvm.swapfile": ("PATH", "swap file to read with a crash dump"),
}


class _Version(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        sys.stdout.write(version_text())
        parser.exit()


def _labels(value: str) -> list[str]:
    return [label for label in value.split(",") if label]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvm_exporter",
        description="Prometheus exporter for process, load and swap statistics from "
        "FreeBSD's kvm(3) (libkvm) or Linux's /proc.",
    )
    parser.add_argument(
        "--config.file",
        dest="config_file",
        metavar="PATH",
        help="YAML configuration file (default: built-in defaults)",
    )
    parser.add_argument(
        "--config.check",
        dest="check",
        action="store_true",
        help="check the configuration as a start would (config file, flags, web config and "
        "its TLS files, the source), print one line per file checked and exit",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="poll once, print the exposition to stdout and exit "
        "(for node_exporter's textfile collector)",
    )
    for flag in FLAGS:
        repeated = flag == "web.listen-address"
        parser.add_argument(
            f"--{flag}",
            dest=flag,
            metavar=HELP[flag][0],
            help=HELP[flag][1],
            action="append" if repeated else "store",
            type=_labels if flag == "collector.labels" else str,
        )
    parser.add_argument(
        "--version", action=_Version, nargs=0, help="print version and build facts and exit"
    )
    return parser


def flags_of(args: argparse.Namespace) -> dict[str, Any]:
    return {flag: getattr(args, flag) for flag in FLAGS}


def check(args: argparse.Namespace) -> int:
    """Everything a start checks short of listening; one line per file checked."""
    from .service import prepare

    config, _, source = prepare(args.config_file, flags_of(args))
    source.close()
    print(f"{args.config_file or 'built-in defaults'}: configuration is valid")
    if config.groups.config_file:
        print(f"{config.groups.config_file}: process-exporter configuration is valid")
    if config.web.config_file:
        print(f"{config.web.config_file}: web configuration is valid")
    return 0


def once(args: argparse.Namespace) -> int:
    """Poll once and print the exposition; non-zero if any part of the poll failed."""
    from .service import build_registry, prepare, settings_of
    from .visibility import check

    config, _, source = prepare(args.config_file, flags_of(args))
    try:
        poller = Poller(source, settings_of(config))
        found = check(source)
        poller.poll()
        sys.stdout.buffer.write(generate_latest(build_registry(poller, visibility=lambda: found)))
        sys.stdout.flush()
        return 0 if poller.scraped().up else 1  # the poll printed (interval 0: no new one)
    finally:
        source.close()


def serve_forever(args: argparse.Namespace) -> int:
    from .service import Service

    if os.geteuid() == 0:
        log.warning(
            "running as root, which kvm_exporter never needs: run it as an unprivileged user "
            "(rc.conf kvm_exporter_user, systemd User=)"
        )
    watched = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}
    # Blocked before any thread starts, so every thread inherits the mask and the signals
    # wait for sigwaitinfo below. A Python signal handler would run at an arbitrary point of
    # the main thread, where taking any lock (an Event, the logging lock) can deadlock; a
    # signal during start-up is acted on once the exporter is up.
    signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    service = Service(args.config_file, flags_of(args))
    while True:
        signum = signal.sigwaitinfo(watched).si_signo
        if signum == signal.SIGHUP:
            try:
                service.reload()
            except Exception:
                crash("reload")
            continue
        log.info("received %s, shutting down", signal.Signals(signum).name)
        service.stop()
        return 0


def main(argv: list[str] | None = None) -> int:
    memory.configure()
    args = build_parser().parse_args(argv)
    level, fmt = getattr(args, "log.level"), getattr(args, "log.format")
    # A bad flag is a ConfigError below, logged in the defaults.
    setup(level if level in LOG_LEVELS else "info", fmt if fmt in LOG_FORMATS else "logfmt")
    from .web import WebError

    try:
        if args.check:
            return check(args)
        if args.once or getattr(args, "libkvm.core"):
            return once(args)
        memory.use_c_allocator()
        return serve_forever(args)
    except (ConfigError, SourceError, WebError) as err:
        log.error("%s", err)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception:  # a bug: one line with its traceback, never a raw one
        crash("start-up")
