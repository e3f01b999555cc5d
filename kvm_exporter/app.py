"""The WSGI application: landing page, metrics and health endpoints."""

from __future__ import annotations

import html
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily

from . import __version__
from .exposition import StartResponse, WSGIApp, cached_metrics_app
from .poller import Snapshot
from .quick import WouldBlock

HEALTH_PATH = "/-/healthy"
READY_PATH = "/-/ready"


def _text(start_response: StartResponse, status: str, body: str, ctype: str) -> list[bytes]:
    data = body.encode()
    start_response(
        status, [("Content-Type", f"{ctype}; charset=utf-8"), ("Content-Length", str(len(data)))]
    )
    return [data]


def landing_page(telemetry_path: str) -> str:
    path = html.escape(telemetry_path, quote=True)
    return (
        "<!DOCTYPE html>\n<html><head><title>kvm_exporter</title></head><body>\n"
        f"<h1>kvm_exporter {__version__}</h1>\n"
        "<p>Process, load and swap metrics from kvm(3) or /proc.</p>\n<ul>\n"
        f'<li><a href="{path}">Metrics</a></li>\n'
        f'<li><a href="{HEALTH_PATH}">Health</a></li>\n'
        f'<li><a href="{READY_PATH}">Readiness</a> (the last poll succeeded)</li>\n'
        "</ul>\n</body></html>\n"
    )


class ScrapeCounter:
    """``promhttp_metric_handler_requests_total{code}``: requests of the telemetry path by
    status code, the counter Go exporters' promhttp keeps (node_exporter shows it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(("200", "500", "503"), 0)

    def count(self, code: str) -> None:
        with self._lock:
            self._counts[code] = self._counts.get(code, 0) + 1

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "promhttp_metric_handler_requests",
            "Total number of scrapes by HTTP status code.",
            labels=["code"],
        )
        with self._lock:
            counts = sorted(self._counts.items())
        for code, value in counts:
            family.add_metric([code], value)
        yield family


def _counted(app: WSGIApp, counter: ScrapeCounter) -> WSGIApp:
    def counted(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        def start(status: str, *args: Any) -> Any:
            counter.count(status[:3])
            return start_response(status, *args)

        try:
            return app(environ, start)
        except WouldBlock:  # asked again by a worker, counted then
            raise
        except Exception:
            counter.count("500")  # the server answers 500
            raise

    return counted


def make_app(
    registry: CollectorRegistry,
    telemetry_path: str,
    snapshot: Callable[[], Snapshot],
    cache_key: Callable[[], object] | None = None,
) -> WSGIApp:
    """Route ``telemetry_path`` to the registry (text or OpenMetrics, gzip if asked) and
    count its requests by status code in ``promhttp_metric_handler_requests_total``.

    With ``cache_key``, the exposition is rendered once per value it returns (see
    :func:`~kvm_exporter.exposition.cached_metrics_app`) instead of on every scrape.
    """
    scrapes = ScrapeCounter()
    metrics = _counted(
        cached_metrics_app(registry, cache_key or (lambda: None), live=scrapes), scrapes
    )
    page = landing_page(telemetry_path)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == telemetry_path:
            return metrics(environ, start_response)
        if path == "/":
            return _text(start_response, "200 OK", page, "text/html")
        if path == HEALTH_PATH:
            return _text(start_response, "200 OK", "Healthy\n", "text/plain")
        if path == READY_PATH:
            snap = snapshot()
            if snap.up:
                return _text(start_response, "200 OK", "Ready\n", "text/plain")
            failed = ", ".join(k for k, ok in snap.success.items() if not ok) or "no poll yet"
            return _text(
                start_response, "503 Service Unavailable", f"Not ready: {failed}\n", "text/plain"
            )
        return _text(start_response, "404 Not Found", "Not Found\n", "text/plain")

    return app
