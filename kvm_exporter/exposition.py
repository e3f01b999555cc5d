"""``/metrics``: format negotiation, ``name[]`` filters, and the exposition rendered once per
snapshot instead of once per scrape.

prometheus_client's WSGI app walks the registry and formats every sample on each request
(about 0.6 ms for a typical host, the bulk of a scrape). Between two polls the exposition
cannot change, so :func:`cached_metrics_app` keeps the rendered body per content type and
compression until ``key()`` returns something unequal to what it returned when the body
was rendered. Counters that change with every request (``live``) are rendered each time and
appended, into the same gzip stream.
"""

from __future__ import annotations

import gzip
import logging
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .quick import refuse_to_block

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
Encoder = Callable[[Collector], bytes]

log = logging.getLogger(__name__)
_warned: set[str] = set()
_EOF = b"# EOF\n"
_ALLOW = ("Allow", "OPTIONS, GET, HEAD")


def negotiate(accept: str) -> tuple[Encoder, str]:
    """prometheus_client's choice of format for an ``Accept`` header, without the media
    ranges it cannot parse (``version=abc`` raises in it). Those are skipped, as Go's expfmt
    skips them, and logged once per process."""
    try:
        return choose_encoder(accept)
    except (TypeError, ValueError):
        pass
    usable = []
    for media_range in accept.split(","):
        try:
            choose_encoder(media_range)
            usable.append(media_range)
        except (TypeError, ValueError):
            if not _warned:
                _warned.add(media_range)
                log.warning(
                    "ignoring a media range of Accept that does not parse: %r (logged once)",
                    media_range.strip()[:100],
                )
    return choose_encoder(",".join(usable))


class _Collectors:
    """Several collectors as one."""

    def __init__(self, *collectors: Collector) -> None:
        self._collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for collector in self._collectors:
            yield from collector.collect()


class _Fixed:
    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics)


def only(collector: Collector, names: set[str]) -> list[Metric]:
    """The families of ``collector`` named in ``names``, and from the others the samples so
    named (prometheus_client's ``name[]`` matches sample names only)."""
    kept = []
    for metric in collector.collect():
        samples = metric.samples if metric.name in names else None
        samples = samples or [s for s in metric.samples if s.name in names]
        if samples or metric.name in names:
            copy = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            copy.samples = samples
            kept.append(copy)
    return kept


def cached_metrics_app(
    registry: Collector, key: Callable[[], object], live: Collector | None = None
) -> WSGIApp:
    """``make_wsgi_app(registry)`` (plus ``live``), rendering ``registry`` once per ``key()``.

    ``key()`` must be cheap and must change (compare unequal) whenever the registry's output
    may change, e.g. ``(poller.snapshot(), reload_status)`` with a background poller. It
    returning ``None`` disables the cache for that request (collect-on-scrape mode), as do
    ``name[]`` filters. HEAD is answered as GET (the server sends no body).
    """
    lock = threading.Lock()
    cached_key: list[object] = [None]
    bodies: dict[tuple[str, bool], tuple[bytes, Any]] = {}
    everything = registry if live is None else _Collectors(registry, live)

    def render(encoder: Encoder, compress: bool) -> tuple[bytes, Any]:
        """The registry's part of the body, and the gzip stream to go on with for ``live``."""
        body = encoder(registry)
        if live is None:
            return (gzip.compress(body) if compress else body), None
        body = body.removesuffix(_EOF)  # the live part ends the OpenMetrics exposition
        if not compress:
            return body, None
        stream = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: with gzip's header and trailer
        return stream.compress(body), stream

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD")
        if method == "OPTIONS":
            start_response("200 OK", [_ALLOW, ("Content-Length", "0")])
            return [b""]
        if method not in ("GET", "HEAD"):
            text = f"# HTTP 405 Method Not Allowed: {method}; use OPTIONS, GET or HEAD\n"
            start_response("405 Method Not Allowed", [_ALLOW])
            return [text.encode()]
        encoder, content_type = negotiate(environ.get("HTTP_ACCEPT", ""))
        compress = gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", ""))
        names = parse_qs(environ.get("QUERY_STRING", "")).get("name[]")
        current = None if names else key()
        if names or current is None:
            refuse_to_block()  # renders
        if names:
            metrics = only(everything, set(names))
            if not metrics:
                start_response("400 Bad Request", [("Content-Type", "text/plain; charset=utf-8")])
                return [f"name[] matches no metric: {', '.join(names)[:200]}\n".encode()]
            body = encoder(_Fixed(metrics))
            body = gzip.compress(body) if compress else body
        elif current is None:
            body = encoder(everything)
            body = gzip.compress(body) if compress else body
        else:
            variant = (content_type, compress)
            # One renderer at a time: scrapers arriving together after a poll wait for one
            # render instead of each doing its own.
            if not lock.acquire(blocking=False):
                refuse_to_block()  # another thread renders
                lock.acquire()
            try:
                if cached_key[0] != current:
                    bodies.clear()
                    cached_key[0] = current
                if variant not in bodies:
                    refuse_to_block()
                    bodies[variant] = render(encoder, compress)
                body, stream = bodies[variant]
            finally:
                lock.release()
            if live is not None:
                tail = encoder(live)
                if stream is None:
                    body += tail
                else:
                    stream = stream.copy()
                    body += stream.compress(tail) + stream.flush()
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        if compress:
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [body]

    return app
