"""Run kvm_exporter with :mod:`kvm_exporter.exposition`'s cache wired in, as proposed.

A bench-only prototype of the wiring: ``app.make_app`` would call
``cached_metrics_app(registry, key)`` instead of ``make_wsgi_app(registry)``, with ``key``
returning ``None`` in collect-on-scrape mode and the latest snapshot otherwise. Arguments
are kvm_exporter's.
"""

from __future__ import annotations

import sys

from kvm_exporter import app, cli, service
from kvm_exporter.exposition import cached_metrics_app
from kvm_exporter.poller import Poller

pollers: list[Poller] = []


class RecordingPoller(Poller):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        pollers.append(self)


def key() -> object:
    poller = pollers[-1]
    return None if poller.settings.interval == 0 else poller.snapshot()


service.Poller = RecordingPoller  # type: ignore[misc]
app.make_wsgi_app = lambda registry: cached_metrics_app(registry, key)  # type: ignore[assignment]

if __name__ == "__main__":
    sys.exit(cli.main())
