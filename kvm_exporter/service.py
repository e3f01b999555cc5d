"""The running exporter: source, poller, HTTP server, and reload on SIGHUP."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from . import __version__
from .app import make_app
from .collector import KvmCollector, OwnUsageCollector, ReloadStatus, VisibilityCollector
from .compat import NodeCollector
from .config import Config, ConfigError, format_duration, load_config
from .groups.families import GroupCollector
from .logs import configure
from .poller import Poller, Settings
from .records import Source, SourceError
from .sources import open_source
from .version import revision
from .visibility import Visibility, check
from .web import Server, listen_target, serve
from .webconfig import WebSettings, load_web_config

log = logging.getLogger(__name__)


def settings_of(config: Config) -> Settings:
    return Settings(
        interval=config.interval,
        labels=config.labels,
        max_series=config.max_series,
        compat=config.compat,
        groups=config.groups.process_names,
        children=config.groups.children,
        details=config.groups.details,
        resources=config.resources.labels if config.resources.enabled else None,
        top=config.top,
        top_labels=config.resources.labels,
    )


def source_key(config: Config) -> tuple[Any, ...]:
    """The settings that decide which source is open; a change means reopening it."""
    return (config.source, config.procfs, config.libkvm)


def build_registry(
    poller: Poller,
    reload_status: Callable[[], ReloadStatus] | None = None,
    visibility: Callable[[], Visibility] = dict,
) -> CollectorRegistry:
    """A private registry holding only this exporter's collector (no reloads: ``--once``)."""
    registry = CollectorRegistry()
    registry.register(
        KvmCollector(
            poller.snapshot,
            lambda: poller.source.name,
            reload_status or (lambda: ReloadStatus(True, 0, time.time())),
        )
    )
    registry.register(VisibilityCollector(visibility))
    registry.register(NodeCollector(poller))  # serves nothing unless compat asks for it
    registry.register(GroupCollector(poller))  # serves nothing unless groups are configured
    return registry


def prepare(
    config_path: str | None, flags: dict[str, Any]
) -> tuple[Config, WebSettings | None, Source]:
    """Everything a start checks before it listens: the config file and flags (whose log
    settings it applies), the listen addresses' hosts, the web config with its TLS files, and
    the source, opened (the caller closes it). A start, ``--once`` and ``--config.check`` all
    go through here. Raises ConfigError, WebError or SourceError."""
    config = load_config(config_path, flags)
    configure(config.log.level, config.log.format)
    if config.libkvm.core:  # a crash dump can only be read through libkvm
        config = dataclasses.replace(config, source="libkvm")
    for address in config.web.listen_address:
        listen_target(address)
    web_file = config.web.config_file
    web_settings = load_web_config(web_file) if web_file else None
    return config, web_settings, _opened(config, None)


def _opened(config: Config, running: Source | None) -> Source:
    """The source ``config`` asks for: ``running`` if given, else one opened (closed again if
    it cannot read what the config asks of it: ``groups.details``)."""
    source = running or open_source(config)
    if config.groups.details and not hasattr(source, "details"):
        if running is None:
            source.close()
        raise SourceError(
            f"groups.details: the {source.name} source reads no details of processes"
            " (only procfs does, on Linux)"
        )
    return source


class Service:
    """Everything a long-running exporter holds; built from the config file and flags.

    Raises ConfigError, SourceError or WebError (all with one-line messages) if it
    cannot start.
    """

    def __init__(self, config_path: str | None, flags: dict[str, Any]) -> None:
        self.config_path = config_path
        self.flags = flags
        self.config, web_settings, source = prepare(config_path, flags)
        web = self.config.web
        self._reload = ReloadStatus(True, 0, time.time())
        self.servers: list[Server] = []
        try:
            self.poller = Poller(source, settings_of(self.config))
            self.visibility = check(source)
            registry = build_registry(self.poller, lambda: self._reload, lambda: self.visibility)
            registry.register(OwnUsageCollector(lambda: self.poller.source))  # not in --once
            app = make_app(registry, web.telemetry_path, self.poller.snapshot, self._cache_key)
            for address in web.listen_address:  # one server per address, all with one app
                self.servers.append(serve(app, address, web_settings, quick_app=True))
        except BaseException:
            for server in self.servers:
                server.shutdown()
            source.close()
            raise
        # Listening first: a taken port fails at once. The first poll runs on the poller's
        # thread, so a source that hangs holds up neither start-up nor SIGTERM; scrapes wait
        # up to FIRST_POLL_WAIT for it.
        self.poller.start()
        fields = {
            "version": __version__,
            "revision": revision(),
            "source": source.name,
            "config": config_path or "none",
            "interval": format_duration(self.config.interval),
        }
        log.info("starting kvm_exporter", extra={"fields": fields})
        for server in self.servers:
            host, port = server.address[:2]
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            tls = web_settings is not None and web_settings.tls is not None
            log.info("listening", extra={"fields": {"address": where, "tls": tls}})

    def _cache_key(self) -> object:
        """Changes with every poll and reload; None (no cache) when polling on each scrape."""
        if self.poller.settings.interval == 0:
            return None
        return (self.poller.snapshot(), self._reload)

    def reload(self) -> bool:
        """Re-read the config file; on any error keep the running config and say why."""
        try:
            config = load_config(self.config_path, self.flags)
            source: Source | None = None
            if source_key(config) != source_key(self.config):
                source = _opened(config, None)
            else:
                _opened(config, self.poller.source)
        except (ConfigError, SourceError) as err:
            self._reload = self._reload._replace(
                successful=False, failures=self._reload.failures + 1
            )
            log.error("reload failed, still serving the previous configuration: %s", err)
            return False
        if config.web != self.config.web:
            log.warning("web settings changed in %s: they take effect on restart", self.config_path)
            config = dataclasses.replace(config, web=self.config.web)
        old = self.poller.reconfigure(source or self.poller.source, settings_of(config))
        if source is not None:
            old.close()
        configure(config.log.level, config.log.format)
        self.visibility = check(self.poller.source)
        self.config = config
        self._reload = ReloadStatus(True, self._reload.failures, time.time())
        log.info("configuration reloaded from %s", self.config_path or "built-in defaults")
        return True

    def stop(self) -> None:
        """Stop polling, stop serving, release the source."""
        self.poller.stop()
        for server in self.servers:
            server.shutdown()
        self.poller.source.close()
