"""``/metrics`` rendered once per snapshot instead of once per scrape.

prometheus_client's WSGI app walks the registry and formats every sample on each request
(about 0.6 ms for a typical host, the bulk of a scrape). Between two polls the exposition
cannot change, so :func:`cached_metrics_app` keeps the rendered body per content type and
compression until ``key()`` returns something unequal to what it returned when the body
was rendered.
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def cached_metrics_app(registry: Collector, key: Callable[[], object]) -> WSGIApp:
    """A drop-in for ``make_wsgi_app(registry)`` that renders once per ``key()`` value.

    ``key()`` must be cheap and must change (compare unequal) whenever the registry's output
    may change, e.g. ``(poller.snapshot(), reload_status)`` with a background poller. It
    returning ``None`` disables the cache for that request (collect-on-scrape mode). Requests
    the cache does not cover (``name[]`` filters, methods other than GET) go to the stock app.
    """
    stock = make_wsgi_app(registry)
    lock = threading.Lock()
    cached_key: list[object] = [None]
    bodies: dict[tuple[str, bool], bytes] = {}

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        current = key()
        if (
            current is None
            or environ.get("REQUEST_METHOD") != "GET"
            or "name" in environ.get("QUERY_STRING", "")
        ):
            return stock(environ, start_response)  # type: ignore[no-any-return]
        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
        compress = gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", ""))
        variant = (content_type, compress)
        # One renderer at a time: scrapers arriving together after a poll wait for one render
        # instead of each doing its own.
        with lock:
            if cached_key[0] != current:
                bodies.clear()
                cached_key[0] = current
            body = bodies.get(variant)
            if body is None:
                body = encoder(registry)
                if compress:
                    body = gzip.compress(body)
                bodies[variant] = body
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        if compress:
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [body]

    return app
