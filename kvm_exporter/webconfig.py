"""The web config file: exporter-toolkit's format for TLS, basic auth and response headers.

See https://github.com/prometheus/exporter-toolkit/blob/master/docs/web-configuration.md.
The loader checks everything it can at startup: keys, types, values, that the certificate,
key and client CA files load, and that every password hash is a bcrypt hash.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import (
    ConfigError,
    Invalid,
    Rules,
    build,
    list_of,
    one_of,
    parse_duration,
    read_yaml,
    shown,
)
from .files import Unreadable, read_file

log = logging.getLogger("kvm_exporter.web")

TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}

CLIENT_AUTH_TYPES = (
    "NoClientCert",
    "RequestClientCert",
    "RequireAnyClientCert",
    "VerifyClientCertIfGiven",
    "RequireAndVerifyClientCert",
)
"""Go's tls.ClientAuthType names. Python's ssl cannot ask for a certificate without checking
it, so RequestClientCert does not ask for one and RequireAnyClientCert verifies it against
``client_ca_file`` like RequireAndVerifyClientCert (stricter, never weaker, than Go)."""

_VERIFY_MODES = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_NONE,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}

# Go's names (crypto/tls CipherSuites()) to OpenSSL's. The TLS 1.3 suites are accepted and,
# as in Go, not configurable.
CIPHER_SUITES = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_AES_128_GCM_SHA256": "",
    "TLS_AES_256_GCM_SHA384": "",
    "TLS_CHACHA20_POLY1305_SHA256": "",
}

CURVES = ("CurveP256", "CurveP384", "CurveP521", "X25519")

# exporter-toolkit's allowed headers; a tuple lists the only values accepted (any case).
HEADERS: dict[str, tuple[str, ...] | None] = {
    "Content-Security-Policy": None,
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
}

_BCRYPT = re.compile(r"^\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")


@dataclass(frozen=True)
class TLSSettings:
    cert_file: str
    key_file: str
    client_auth_type: str = "NoClientCert"
    client_ca_file: str | None = None
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    cipher_suites: tuple[str, ...] = ()
    curve_preferences: tuple[str, ...] = ()
    prefer_server_cipher_suites: bool = True


@dataclass(frozen=True)
class HTTPSettings:
    http2: bool = True
    """Accepted for compatibility; the server speaks HTTP/1.x only."""
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RateLimit:
    interval: float = 0.0
    """Seconds between two requests on average; 0 is no limit."""
    burst: int = 0
    """Requests allowed at once after a quiet spell."""


@dataclass(frozen=True)
class WebSettings:
    tls: TLSSettings | None = field(default=None, metadata={"key": "tls_server_config"})
    """None (also for an empty tls_server_config): plain HTTP."""
    http: HTTPSettings = field(default_factory=HTTPSettings, metadata={"key": "http_server_config"})
    basic_auth_users: tuple[tuple[str, str], ...] = ()
    """(user, bcrypt hash) pairs; empty means no authentication."""
    rate_limit: RateLimit = field(default_factory=RateLimit)
    """exporter-toolkit's token bucket over every request; past it, 429 Too Many Requests."""


def _mapping(value: Any) -> dict[Any, Any]:
    if not isinstance(value, dict | None):
        raise Invalid("expected a mapping")  # without the value: it may hold a secret
    return value or {}


def _headers(value: Any) -> tuple[tuple[str, str], ...]:
    """The headers mapping as (name, value) pairs in HEADERS' order; an empty value is none."""
    headers = _mapping(value)
    for name, text in headers.items():
        if name not in HEADERS:
            raise Invalid(
                f"unknown key (expected one of {', '.join(HEADERS)})",
                at=name if isinstance(name, str) else shown(name),
            )
        allowed = HEADERS[name]
        if (
            not isinstance(text, str)
            or "\r" in text
            or "\n" in text
            or (allowed and text and text.lower() not in allowed)
        ):
            expected = "one of " + ", ".join(allowed) if allowed else "a single-line string"
            raise Invalid(f"got {shown(text)}, expected {expected}", at=name)
    return tuple((name, headers[name]) for name in HEADERS if headers.get(name))


def _users(value: Any) -> tuple[tuple[str, str], ...]:
    """basic_auth_users: a mapping of user names to bcrypt hashes."""
    users = _mapping(value)
    for user, hashed in users.items():
        if not isinstance(user, str) or not user or ":" in user:
            raise Invalid(f"got user name {shown(user)}, expected a non-empty string without ':'")
        # The value is a secret: the message never repeats it.
        if not isinstance(hashed, str) or not _BCRYPT.match(hashed):
            raise Invalid(
                "expected a bcrypt hash such as $2y$10$... "
                "(make one with: htpasswd -nBC 10 \"\" | tr -d ':\\n')",
                at=user,
            )
    return tuple(users.items())


def _tls(tls: TLSSettings | None) -> TLSSettings | None:
    """The checks between keys of tls_server_config."""
    if tls is None:
        return None
    verifying = _VERIFY_MODES[tls.client_auth_type] != ssl.CERT_NONE
    if verifying and tls.client_ca_file is None:
        raise Invalid(
            f"missing, expected the CA file that {tls.client_auth_type} checks client "
            "certificates with",
            at="client_ca_file",
        )
    if tls.client_ca_file is not None and not verifying:
        raise Invalid(
            f"got {tls.client_auth_type!r}, expected RequireAndVerifyClientCert or "
            "VerifyClientCertIfGiven when client_ca_file is set",
            at="client_auth_type",
        )
    if TLS_VERSIONS[tls.min_version] > TLS_VERSIONS[tls.max_version]:
        raise Invalid(
            f"got {tls.max_version!r}, expected {tls.min_version} or later", at="max_version"
        )
    return tls


def _rate_limit(limit: RateLimit) -> RateLimit:
    if limit.interval > 0 and limit.burst < 1:
        raise Invalid(f"got {limit.burst}, expected 1 or more when interval is set", at="burst")
    return limit


_PARSERS: Rules = {
    "tls_server_config.client_auth_type": one_of(CLIENT_AUTH_TYPES),
    "tls_server_config.min_version": one_of(tuple(TLS_VERSIONS)),
    "tls_server_config.max_version": one_of(tuple(TLS_VERSIONS)),
    "tls_server_config.cipher_suites": list_of(tuple(CIPHER_SUITES), repeats=True),
    "tls_server_config.curve_preferences": list_of(CURVES, repeats=True),
    "http_server_config.headers": _headers,
    "basic_auth_users": _users,
    "rate_limit.interval": parse_duration,
}
_CHECKS: Rules = {"tls_server_config": _tls, "rate_limit": _rate_limit}


def ssl_context(tls: TLSSettings, where: str = "<web config>") -> ssl.SSLContext:
    """A server-side SSLContext for ``tls``; ConfigError if a file does not load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[tls.min_version]
    context.maximum_version = TLS_VERSIONS[tls.max_version]
    context.verify_mode = _VERIFY_MODES[tls.client_auth_type]
    if tls.prefer_server_cipher_suites:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ciphers = [CIPHER_SUITES[name] for name in tls.cipher_suites if CIPHER_SUITES[name]]
    cert, key = tls.cert_file, tls.key_file
    # OpenSSL opens the files itself: each is first checked to be a regular file of a sane
    # size, or it would block on a FIFO or read a device without end.
    steps: list[tuple[str, str, Callable[[], object]]] = [
        ("cert_file", cert, lambda: read_file(cert)),
        ("key_file", key, lambda: read_file(key)),
        ("cert_file", f"{cert} with {key}", lambda: context.load_cert_chain(cert, key)),
    ]
    if tls.client_ca_file is not None:
        ca = tls.client_ca_file
        steps.append(("client_ca_file", ca, lambda: read_file(ca)))
        steps.append(("client_ca_file", ca, lambda: context.load_verify_locations(cafile=ca)))
    if ciphers:
        steps.append(("cipher_suites", "", lambda: context.set_ciphers(":".join(ciphers))))
    for name, files, step in steps:
        try:
            step()
        except ssl.SSLError as err:
            reason = f"OpenSSL refused it: {err.reason or err}"
            raise ConfigError(f"{where}: tls_server_config.{name}: {files}: {reason}") from None
        except (OSError, Unreadable) as err:
            reason = f"cannot read it: {err.strerror if isinstance(err, OSError) else err}"
            raise ConfigError(f"{where}: tls_server_config.{name}: {files}: {reason}") from None
    return context


def load_web_config(path: str) -> WebSettings:
    """Read the web config file at ``path``; relative file names in it are relative to it."""
    base = os.path.dirname(os.path.abspath(path))

    def readable(value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise ValueError("a file name")
        file = os.path.join(base, value)
        try:
            read_file(file)
        except Unreadable as err:
            raise Invalid(f"cannot read {file}: {err}") from None
        return file

    files = ("cert_file", "key_file", "client_ca_file")
    parsers = {**_PARSERS, **{f"tls_server_config.{name}": readable for name in files}}
    settings = build(WebSettings, read_yaml(path, "web config file"), path, parsers, _CHECKS)
    if settings.tls is not None:
        ssl_context(settings.tls, path)
        if settings.tls.curve_preferences:
            log.warning(
                "%s: tls_server_config.curve_preferences is not applied: Python's ssl module "
                "cannot set a curve list, OpenSSL's default order is used",
                path,
            )
    return settings
