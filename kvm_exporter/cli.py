"""Command line: flags in the Prometheus family's style, then run, check or print once."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any

from prometheus_client import generate_latest

from . import __version__
from .config import DEFAULT_PORT, LOG_LEVELS, ConfigError, load_config, with_overrides
from .logs import set_level, setup
from .poller import Poller
from .records import SourceError
from .sources import open_source

log = logging.getLogger("kvm_exporter")

# Flag name -> the dotted config key it overrides.
OVERRIDES = {
    "web.listen-address": "web.listen_address",
    "web.telemetry-path": "web.telemetry_path",
    "web.config.file": "web.config_file",
    "log.level": "log.level",
    "libkvm.library": "libkvm.library",
    "libkvm.kernel": "libkvm.kernel",
    "libkvm.core": "libkvm.core",
    "libkvm.swapfile": "libkvm.swapfile",
}

HELP = {
    "web.listen-address": f"address to listen on (default :{DEFAULT_PORT})",
    "web.telemetry-path": "path under which to expose metrics (default /metrics)",
    "web.config.file": "exporter-toolkit web config file: TLS, basic auth, headers",
    "log.level": "one of " + ", ".join(LOG_LEVELS) + " (default info)",
    "libkvm.library": "path of libkvm to load (default libkvm.so.7)",
    "libkvm.kernel": "kernel image of a crash dump (with --libkvm.core)",
    "libkvm.core": "crash dump to read once: print its metrics and exit",
    "libkvm.swapfile": "swap file to read with a crash dump",
}


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
        help="check the configuration, print the result and exit",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="poll once, print the exposition to stdout and exit "
        "(for node_exporter's textfile collector)",
    )
    for flag, key in OVERRIDES.items():
        parser.add_argument(f"--{flag}", dest=key, metavar="VALUE", help=HELP[flag])
    parser.add_argument("--version", action="version", version=f"kvm_exporter {__version__}")
    return parser


def overrides_of(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, key) for key in OVERRIDES.values()}


def check(args: argparse.Namespace) -> int:
    from .webconfig import load_web_config

    config = load_config(args.config_file, overrides_of(args))
    if config.web.config_file:
        load_web_config(config.web.config_file)
    print(f"{args.config_file or 'built-in defaults'}: configuration is valid")
    return 0


def once(args: argparse.Namespace) -> int:
    """Poll once and print the exposition; non-zero if any part of the poll failed."""
    from .service import build_registry, settings_of

    config = load_config(args.config_file, overrides_of(args))
    if config.libkvm.core:  # a crash dump can only be read through libkvm
        config = with_overrides(config, {"source": "libkvm"})
    set_level(config.log.level)
    source = open_source(config)
    try:
        poller = Poller(source, settings_of(config))
        poller.poll()
        sys.stdout.buffer.write(generate_latest(build_registry(poller)))
        sys.stdout.flush()
        return 0 if poller.snapshot().up else 1
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
    service = Service(args.config_file, overrides_of(args))
    while True:
        signum = signal.sigwaitinfo(watched).si_signo
        if signum == signal.SIGHUP:
            service.reload()
            continue
        log.info("received %s, shutting down", signal.Signals(signum).name)
        service.stop()
        return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = getattr(args, "log.level") or "info"
    setup(level if level in LOG_LEVELS else "info")  # a bad flag is a ConfigError below
    from .web import WebError

    try:
        if args.check:
            return check(args)
        if args.once or getattr(args, "libkvm.core"):
            return once(args)
        return serve_forever(args)
    except (ConfigError, SourceError, WebError) as err:
        log.error("%s", err)
        return 1
    except KeyboardInterrupt:
        return 130
