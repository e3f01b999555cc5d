"""The WSGI application: landing page, metrics and health endpoints."""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, make_wsgi_app

from . import __version__
from .exposition import StartResponse, WSGIApp, cached_metrics_app
from .poller import Snapshot

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


def make_app(
    registry: CollectorRegistry,
    telemetry_path: str,
    snapshot: Callable[[], Snapshot],
    cache_key: Callable[[], object] | None = None,
) -> WSGIApp:
    """Route ``telemetry_path`` to the registry (text or OpenMetrics, gzip if asked).

    With ``cache_key``, the exposition is rendered once per value it returns (see
    :func:`~kvm_exporter.exposition.cached_metrics_app`) instead of on every scrape.
    """
    metrics: WSGIApp = (
        make_wsgi_app(registry) if cache_key is None else cached_metrics_app(registry, cache_key)
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
