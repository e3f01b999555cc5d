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
from typing import Any, TypeVar

from .config import ConfigError, read_yaml

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
class WebSettings:
    tls: TLSSettings | None = None
    http: HTTPSettings = field(default_factory=HTTPSettings)
    basic_auth_users: tuple[tuple[str, str], ...] = ()
    """(user, bcrypt hash) pairs; empty means no authentication."""


T = TypeVar("T")


class _Section:
    """One mapping of the file, read key by key; errors name the file and the dotted key."""

    def __init__(self, data: Any, where: str, name: str, keys: tuple[str, ...]) -> None:
        self.where, self.prefix = where, name + "." if name else ""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise self.error(name or "top level", data, "a mapping")
        for key in data:
            if key not in keys:
                raise ConfigError(
                    f"{where}: {self.prefix}{key}: unknown key (expected one of {', '.join(keys)})"
                )
        self.data: dict[str, Any] = data

    def error(self, key: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(f"{self.where}: {key}: got {value!r}, expected {expected}")

    def missing(self, key: str, expected: str) -> ConfigError:
        return ConfigError(f"{self.where}: {self.prefix}{key}: missing, expected {expected}")

    def get(self, key: str, default: T, check: Callable[[Any], bool], expected: str) -> T:
        """The value at ``key`` or ``default``; ``check`` says whether a value is good."""
        if key not in self.data:
            return default
        value = self.data[key]
        if not check(value):
            raise self.error(self.prefix + key, value, expected)
        return value  # type: ignore[no-any-return]

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        return self.get(key, default, lambda v: v in choices, "one of " + ", ".join(choices))

    def choices(self, key: str, choices: tuple[str, ...]) -> tuple[str, ...]:
        def check(value: Any) -> bool:
            return isinstance(value, list) and all(v in choices for v in value)

        return tuple(self.get(key, [], check, "a list drawn from " + ", ".join(choices)))

    def boolean(self, key: str, default: bool) -> bool:
        return self.get(key, default, lambda v: isinstance(v, bool), "true or false")


def _file(section: _Section, key: str, base: str) -> str | None:
    """The path at ``key`` resolved against ``base``, checked to be a readable file."""
    value: str | None = section.get(
        key, None, lambda v: isinstance(v, str) and v != "", "a file name"
    )
    if value is None:
        return None
    path = os.path.join(base, value)
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise ConfigError(
            f"{section.where}: {section.prefix}{key}: cannot read {path}: {err.strerror}"
        ) from None
    return path


def _required_file(section: _Section, key: str, base: str) -> str:
    path = _file(section, key, base)
    if path is None:
        raise section.missing(key, "a file name")
    return path


def _tls(data: Any, where: str, base: str) -> TLSSettings | None:
    keys = tuple(TLSSettings.__dataclass_fields__)
    section = _Section(data, where, "tls_server_config", keys)
    if not section.data:
        return None
    cert_file = _required_file(section, "cert_file", base)
    key_file = _required_file(section, "key_file", base)
    client_auth_type = section.choice("client_auth_type", "NoClientCert", CLIENT_AUTH_TYPES)
    client_ca_file = _file(section, "client_ca_file", base)
    verifying = _VERIFY_MODES[client_auth_type] != ssl.CERT_NONE
    if verifying and client_ca_file is None:
        raise section.missing(
            "client_ca_file", f"the CA file that {client_auth_type} checks client certificates with"
        )
    if client_ca_file is not None and not verifying:
        raise section.error(
            "tls_server_config.client_auth_type",
            client_auth_type,
            "RequireAndVerifyClientCert or VerifyClientCertIfGiven when client_ca_file is set",
        )
    versions = tuple(TLS_VERSIONS)
    tls = TLSSettings(
        cert_file=cert_file,
        key_file=key_file,
        client_auth_type=client_auth_type,
        client_ca_file=client_ca_file,
        min_version=section.choice("min_version", "TLS12", versions),
        max_version=section.choice("max_version", "TLS13", versions),
        cipher_suites=section.choices("cipher_suites", tuple(CIPHER_SUITES)),
        curve_preferences=section.choices("curve_preferences", CURVES),
        prefer_server_cipher_suites=section.boolean("prefer_server_cipher_suites", True),
    )
    if TLS_VERSIONS[tls.min_version] > TLS_VERSIONS[tls.max_version]:
        raise section.error(
            "tls_server_config.max_version", tls.max_version, f"{tls.min_version} or later"
        )
    ssl_context(tls, where)
    if tls.curve_preferences:
        log.warning(
            "%s: tls_server_config.curve_preferences is not applied: Python's ssl module "
            "cannot set a curve list, OpenSSL's default order is used",
            where,
        )
    return tls


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
    steps: list[tuple[str, str, Callable[[], None]]] = [
        ("cert_file", f"{cert} with {key}", lambda: context.load_cert_chain(cert, key)),
    ]
    if tls.client_ca_file is not None:
        ca = tls.client_ca_file
        steps.append(("client_ca_file", ca, lambda: context.load_verify_locations(cafile=ca)))
    if ciphers:
        steps.append(("cipher_suites", "", lambda: context.set_ciphers(":".join(ciphers))))
    for name, files, step in steps:
        try:
            step()
        except ssl.SSLError as err:
            reason = f"OpenSSL refused it: {err.reason or err}"
            raise ConfigError(f"{where}: tls_server_config.{name}: {files}: {reason}") from None
        except OSError as err:
            reason = f"cannot read it: {err.strerror}"
            raise ConfigError(f"{where}: tls_server_config.{name}: {files}: {reason}") from None
    return context


def _http(data: Any, where: str) -> HTTPSettings:
    section = _Section(data, where, "http_server_config", ("http2", "headers"))
    headers = _Section(
        section.data.get("headers"), where, "http_server_config.headers", tuple(HEADERS)
    )
    pairs = []
    for name, allowed in HEADERS.items():
        expected = "one of " + ", ".join(allowed) if allowed else "a single-line string"

        def check(value: Any, allowed: tuple[str, ...] | None = allowed) -> bool:
            if not isinstance(value, str) or "\r" in value or "\n" in value:
                return False
            return allowed is None or value == "" or value.lower() in allowed

        value = headers.get(name, "", check, expected)
        if value:
            pairs.append((name, value))
    return HTTPSettings(http2=section.boolean("http2", True), headers=tuple(pairs))


def _users(data: Any, where: str) -> tuple[tuple[str, str], ...]:
    if data is None:
        return ()
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: basic_auth_users: got {data!r}, expected a mapping")
    users = []
    for user, hashed in data.items():
        if not isinstance(user, str) or not user or ":" in user:
            raise ConfigError(
                f"{where}: basic_auth_users: got user name {user!r}, "
                "expected a non-empty string without ':'"
            )
        # The value is a secret: the message never repeats it.
        if not isinstance(hashed, str) or not _BCRYPT.match(hashed):
            raise ConfigError(
                f"{where}: basic_auth_users.{user}: expected a bcrypt hash such as "
                "$2y$10$... (make one with: htpasswd -nBC 10 \"\" | tr -d ':\\n')"
            )
        users.append((user, hashed))
    return tuple(users)


def load_web_config(path: str) -> WebSettings:
    """Read the web config file at ``path``; relative file names in it are relative to it."""
    keys = ("tls_server_config", "http_server_config", "basic_auth_users")
    top = _Section(read_yaml(path, "web config file"), path, "", keys)
    base = os.path.dirname(os.path.abspath(path))
    return WebSettings(
        tls=_tls(top.data.get("tls_server_config"), path, base),
        http=_http(top.data.get("http_server_config"), path),
        basic_auth_users=_users(top.data.get("basic_auth_users"), path),
    )
