"""The web config loader: exporter-toolkit's format, every mistake a clear ConfigError."""

from __future__ import annotations

import re
import shutil
import ssl
from pathlib import Path

import bcrypt
import pytest
import tlsutil
from conftest import REPO

from kvm_exporter.config import ConfigError
from kvm_exporter.webconfig import (
    HTTPSettings,
    RateLimit,
    TLSSettings,
    WebSettings,
    load_web_config,
    ssl_context,
)

HASH = bcrypt.hashpw(b"secret", bcrypt.gensalt(4)).decode()
TLS = "tls_server_config:\n  cert_file: server.pem\n  key_file: server-key.pem\n"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tlsutil.write_pki(tmp_path_factory.mktemp("pki"))


def load(directory: Path, text: str) -> WebSettings:
    path = directory / "web.yml"
    path.write_text(text)
    return load_web_config(str(path))


def test_empty_file_means_plain_http_without_auth(pki: Path) -> None:
    assert load(pki, "") == WebSettings()
    assert load(pki, "tls_server_config: {}\nbasic_auth_users:\n") == WebSettings()


def test_full_config_with_relative_paths_resolved_against_the_file(pki: Path) -> None:
    text = TLS + (
        "  client_auth_type: RequireAndVerifyClientCert\n"
        "  client_ca_file: ca.pem\n"
        "  min_version: TLS13\n"
        "  max_version: TLS13\n"
        "  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_AES_128_GCM_SHA256]\n"
        "  prefer_server_cipher_suites: false\n"
        "http_server_config:\n"
        "  http2: false\n"
        "  headers:\n"
        "    X-Frame-Options: deny\n"
        "    Strict-Transport-Security: max-age=31536000\n"
        "    Content-Security-Policy: ''\n"
        f"basic_auth_users:\n  alice: {HASH}\n  bob: '{HASH.replace('$2b$', '$2y$')}'\n"
    )
    assert load(pki, text) == WebSettings(
        tls=TLSSettings(
            cert_file=str(pki / "server.pem"),
            key_file=str(pki / "server-key.pem"),
            client_auth_type="RequireAndVerifyClientCert",
            client_ca_file=str(pki / "ca.pem"),
            min_version="TLS13",
            max_version="TLS13",
            cipher_suites=("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "TLS_AES_128_GCM_SHA256"),
            prefer_server_cipher_suites=False,
        ),
        http=HTTPSettings(
            http2=False,
            headers=(
                ("Strict-Transport-Security", "max-age=31536000"),
                ("X-Frame-Options", "deny"),
            ),
        ),
        basic_auth_users=(("alice", HASH), ("bob", HASH.replace("$2b$", "$2y$"))),
    )


def test_absolute_paths_and_curve_preferences_are_accepted(
    pki: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = (
        f"tls_server_config:\n  cert_file: {pki / 'server.pem'}\n"
        f"  key_file: {pki / 'server-key.pem'}\n  curve_preferences: [X25519, CurveP256]\n"
    )
    tls = load(tmp_path, text).tls
    assert tls is not None and tls.cert_file == str(pki / "server.pem")
    assert tls.curve_preferences == ("X25519", "CurveP256")
    assert "curve_preferences is not applied" in caplog.text


BAD = [
    ("tls_config: {}\n", "web.yml: tls_config: unknown key (expected one of basic_auth_users, "),
    ("- a list\n", "web.yml: top level: expected a mapping"),
    ("tls_server_config: [1]\n", "web.yml: tls_server_config: expected a mapping"),
    (TLS + "  client_auth: NoClientCert\n", "web.yml: tls_server_config.client_auth: unknown key"),
    (
        "tls_server_config:\n  key_file: server-key.pem\n",
        "web.yml: tls_server_config.cert_file: missing, expected a file name",
    ),
    (
        "tls_server_config:\n  cert_file: server.pem\n",
        "web.yml: tls_server_config.key_file: missing, expected a file name",
    ),
    (
        "tls_server_config:\n  cert_file: 42\n  key_file: server-key.pem\n",
        "web.yml: tls_server_config.cert_file: got 42, expected a file name",
    ),
    (
        "tls_server_config:\n  cert_file: nothere.pem\n  key_file: server-key.pem\n",
        "web.yml: tls_server_config.cert_file: cannot read {dir}/nothere.pem: No such file",
    ),
    (
        "tls_server_config:\n  cert_file: server-key.pem\n  key_file: server-key.pem\n",
        "web.yml: tls_server_config.cert_file: {dir}/server-key.pem with {dir}/server-key.pem: "
        "OpenSSL refused it",
    ),
    (
        "tls_server_config:\n  cert_file: server.pem\n  key_file: client-key.pem\n",
        "web.yml: tls_server_config.cert_file: {dir}/server.pem with {dir}/client-key.pem: "
        "OpenSSL refused it: KEY_VALUES_MISMATCH",
    ),
    (
        TLS + "  client_auth_type: RequireClientCert\n",
        "web.yml: tls_server_config.client_auth_type: got 'RequireClientCert', expected one of "
        "NoClientCert, RequestClientCert, RequireAnyClientCert, VerifyClientCertIfGiven, "
        "RequireAndVerifyClientCert",
    ),
    (
        TLS + "  client_auth_type: RequireAndVerifyClientCert\n",
        "web.yml: tls_server_config.client_ca_file: missing, expected the CA file that "
        "RequireAndVerifyClientCert checks client certificates with",
    ),
    (
        TLS + "  client_ca_file: ca.pem\n",
        "web.yml: tls_server_config.client_auth_type: got 'NoClientCert', expected "
        "RequireAndVerifyClientCert or VerifyClientCertIfGiven when client_ca_file is set",
    ),
    (
        TLS
        + "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: /nonexistent/ca.pem\n",
        "web.yml: tls_server_config.client_ca_file: cannot read /nonexistent/ca.pem: No such file",
    ),
    (
        TLS + "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: web.yml\n",
        "web.yml: tls_server_config.client_ca_file: {dir}/web.yml: OpenSSL refused it",
    ),
    (
        TLS + "  min_version: TLS1.2\n",
        "web.yml: tls_server_config.min_version: got 'TLS1.2', "
        "expected one of TLS10, TLS11, TLS12, TLS13",
    ),
    (
        TLS + "  max_version: 13\n",
        "web.yml: tls_server_config.max_version: got 13, expected one of",
    ),
    (
        TLS + "  min_version: TLS13\n  max_version: TLS12\n",
        "web.yml: tls_server_config.max_version: got 'TLS12', expected TLS13 or later",
    ),
    (
        TLS + "  cipher_suites: TLS_AES_128_GCM_SHA256\n",
        "web.yml: tls_server_config.cipher_suites: got 'TLS_AES_128_GCM_SHA256', expected a list",
    ),
    (
        TLS + "  cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]\n",
        "web.yml: tls_server_config.cipher_suites: got ['TLS_RSA_WITH_RC4_128_SHA'], expected a "
        "list drawn from TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA, ",
    ),
    (
        TLS + "  curve_preferences: [P256]\n",
        "web.yml: tls_server_config.curve_preferences: got ['P256'], expected a list drawn from "
        "CurveP256, CurveP384, CurveP521, X25519",
    ),
    (
        TLS + "  prefer_server_cipher_suites: yes please\n",
        "web.yml: tls_server_config.prefer_server_cipher_suites: got 'yes please', "
        "expected true or false",
    ),
    (
        "http_server_config:\n  http2: 1\n",
        "web.yml: http_server_config.http2: got 1, expected true or false",
    ),
    (
        "http_server_config:\n  headers:\n    Server: nginx\n",
        "web.yml: http_server_config.headers.Server: unknown key (expected one of "
        "Content-Security-Policy, Strict-Transport-Security, X-Content-Type-Options, "
        "X-Frame-Options, X-XSS-Protection)",
    ),
    (
        "http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
        "web.yml: http_server_config.headers.X-Frame-Options: got 'allow', expected one of deny, "
        "sameorigin",
    ),
    (
        'http_server_config:\n  headers:\n    X-XSS-Protection: "1\\r\\nSet-Cookie: a=b"\n',
        "web.yml: http_server_config.headers.X-XSS-Protection: got '1\\r\\nSet-Cookie: a=b', "
        "expected a single-line string",
    ),
    ("basic_auth_users: [alice]\n", "web.yml: basic_auth_users: expected a mapping"),
    (
        "basic_auth_users:\n  alice: hunter2\n",
        "web.yml: basic_auth_users.alice: expected a bcrypt hash such as $2y$10$...",
    ),
    (
        f"basic_auth_users:\n  alice: {HASH[:-1]}\n",
        "web.yml: basic_auth_users.alice: expected a bcrypt hash",
    ),
    (
        f"basic_auth_users:\n  'a:b': {HASH}\n",
        "web.yml: basic_auth_users: got user name 'a:b', expected a non-empty string without ':'",
    ),
    ("tls_server_config: [\n", "web.yml: line 2, column 1: invalid YAML: "),
    # integers past Python's digit limit for str(): the message must still print; keys that
    # long are refused before that
    (
        "http_server_config:\n  headers:\n    X-Frame-Options: 0x" + "f" * 5000 + "\n",
        "web.yml: http_server_config.headers.X-Frame-Options: got an integer too long to show",
    ),
    (
        "http_server_config:\n  headers:\n    ? 0x" + "f" * 5000 + "\n    : x\n",
        "web.yml: line 3, column 7: a key of 5002 characters, expected at most 256",
    ),
    (
        "basic_auth_users:\n  ? 0x" + "f" * 5000 + f"\n  : {HASH}\n",  # YAML's long-key form
        "web.yml: line 2, column 5: a key of 5002 characters, expected at most 256",
    ),
    (
        "rate_limit: {interval: 1s}\n",
        "web.yml: rate_limit.burst: got 0, expected 1 or more when interval is set",
    ),
    (
        "rate_limit: {interval: soon, burst: 1}\n",
        "web.yml: rate_limit.interval: got 'soon', expected a duration such as 15s",
    ),
    ("rate_limit: {burst: many}\n", "web.yml: rate_limit.burst: got 'many', expected an integer"),
    ("rate_limit: {period: 1s}\n", "web.yml: rate_limit.period: unknown key"),
    ("rate_limit: 5\n", "web.yml: rate_limit: expected a mapping"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_config_names_file_key_and_expectation(pki: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(pki, text)
    assert str(caught.value).startswith(str(pki) + "/" + message.format(dir=pki))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "text", ["basic_auth_users:\n  alice: hunter2\n", "basic_auth_users: 'alice:hunter2'\n"]
)
def test_bad_hash_is_not_repeated_in_the_message(pki: Path, text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(pki, text)
    assert "hunter2" not in str(caught.value)


def test_empty_sections_take_their_defaults(pki: Path) -> None:
    text = "tls_server_config:\nhttp_server_config:\n  headers:\nbasic_auth_users: {}\n"
    assert load(pki, text) == WebSettings()


def test_rate_limit_as_exporter_toolkit_writes_it(pki: Path, tmp_path: Path) -> None:
    assert load(pki, "rate_limit: {interval: 500ms, burst: 5}\n").rate_limit == RateLimit(0.5, 5)
    assert load(pki, "rate_limit: {interval: 0}\n").rate_limit == RateLimit(0.0, 0)
    # The shipped example's rate_limit, commented out there, loads once uncommented.
    for name in ("server.pem", "server-key.pem"):
        shutil.copy(pki / name, tmp_path / name)
    shutil.copy(pki / "ca.pem", tmp_path / "clients-ca.pem")
    example = (REPO / "config" / "web-config.yml").read_text()
    assert "# rate_limit:\n" in example
    text = re.sub(r"(?m)^# (rate_limit:|  interval:|  burst:)", r"\1", example)
    assert load(tmp_path, text).rate_limit == RateLimit(1.0, 20)


def test_missing_web_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nothere.yml: cannot read web config file: No such"):
        load_web_config(str(tmp_path / "nothere.yml"))


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_old_tls_versions_reach_the_context(pki: Path) -> None:
    tls = load(pki, TLS + "  min_version: TLS11\n  max_version: TLS12\n").tls
    assert tls is not None
    context = ssl_context(tls)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_1
    assert context.maximum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE
