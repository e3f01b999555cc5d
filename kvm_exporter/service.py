"""The running exporter: source, poller, HTTP server, and reload on SIGHUP."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from .app import make_app
from .collector import KvmCollector, OwnUsageCollector, ReloadStatus
from .compat import NodeCollector
from .config import Config, ConfigError, load_config
from .logs import set_level
from .poller import Poller, Settings
from .records import Source, SourceError
from .sources import open_source
from .web import Server, serve
from .webconfig import load_web_config

log = logging.getLogger(__name__)


def settings_of(config: Config) -> Settings:
    return Settings(
        interval=config.interval,
        labels=config.labels,
        max_series=config.max_series,
        compat=config.compat,
        resources=config.resources.labels if config.resources.enabled else None,
    )


def source_key(config: Config) -> tuple[Any, ...]:
    """The settings that decide which source is open; a change means reopening it."""
    return (config.source, config.procfs, config.libkvm)


def build_registry(
    poller: Poller, reload_status: Callable[[], ReloadStatus] | None = None
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
    registry.register(NodeCollector(poller))  # serves nothing unless compat asks for it
    return registry


class Service:
    """Everything a long-running exporter holds; built from the config file and flags.

    Raises ConfigError, SourceError or WebError (all with one-line messages) if it
    cannot start.
    """

    def __init__(self, config_path: str | None, overrides: dict[str, Any]) -> None:
        self.config_path = config_path
        self.overrides = overrides
        self.config = load_config(config_path, overrides)
        set_level(self.config.log.level)
        web = self.config.web
        web_settings = load_web_config(web.config_file) if web.config_file else None
        self._reload = ReloadStatus(True, 0, time.time())
        source = open_source(self.config)
        try:
            self.poller = Poller(source, settings_of(self.config))
            registry = build_registry(self.poller, lambda: self._reload)
            registry.register(OwnUsageCollector(lambda: self.poller.source))  # not in --once
            app = make_app(registry, web.telemetry_path, self.poller.snapshot, self._cache_key)
            self.server: Server = serve(app, web.listen_address, web_settings)
        except BaseException:
            source.close()
            raise
        # Listening first: a taken port fails at once. The first poll runs on the poller's
        # thread, so a source that hangs holds up neither start-up nor SIGTERM; scrapes wait
        # up to FIRST_POLL_WAIT for it.
        self.poller.start()
        host, port = self.server.address[:2]
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        log.info("listening on %s, source %s", where, source.name)

    def _cache_key(self) -> object:
        """Changes with every poll and reload; None (no cache) when polling on each scrape."""
        if self.poller.settings.interval == 0:
            return None
        return (self.poller.snapshot(), self._reload)

    def reload(self) -> bool:
        """Re-read the config file; on any error keep the running config and say why."""
        try:
            config = load_config(self.config_path, self.overrides)
            source: Source | None = None
            if source_key(config) != source_key(self.config):
                source = open_source(config)
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
        set_level(config.log.level)
        self.config = config
        self._reload = ReloadStatus(True, self._reload.failures, time.time())
        log.info("configuration reloaded from %s", self.config_path or "built-in defaults")
        return True

    def stop(self) -> None:
        """Stop polling, stop serving, release the source."""
        self.poller.stop()
        self.server.shutdown()
        self.poller.source.close()
