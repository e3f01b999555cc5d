"""The real exporter behind the shipped example web config: mutual TLS and basic auth."""

from __future__ import annotations

import base64
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path

import pytest
import tlsutil
from conftest import REPO, exited_or_listens, free_port, wait_until

EXAMPLE = REPO / "config" / "web-config.yml"
AUTH = "Basic " + base64.b64encode(b"prometheus:changeme").decode()


@pytest.fixture
def tls_exporter(tmp_path: Path):
    tlsutil.write_pki(tmp_path)
    shutil.copy(tmp_path / "ca.pem", tmp_path / "clients-ca.pem")
    shutil.copy(EXAMPLE, tmp_path / "web-config.yml")
    for _attempt in range(5):  # another suite may take the free port before we bind it
        port = free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kvm_exporter",
                f"--web.listen-address=127.0.0.1:{port}",
                f"--web.config.file={tmp_path / 'web-config.yml'}",
            ],
            stderr=subprocess.DEVNULL,
            cwd="/",
        )
        wait_until(partial(exited_or_listens, proc, port), what="the TLS listener")
        if proc.poll() is None:
            break
    try:
        yield tmp_path, f"https://127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def context(pki: Path, client: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.check_hostname = False  # the test certificate names "server", not 127.0.0.1
    if client:
        ctx.load_cert_chain(pki / f"{client}.pem", pki / f"{client}-key.pem")
    return ctx


def get(url: str, ctx: ssl.SSLContext, auth: str | None = AUTH) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": auth} if auth else {})
    try:
        with urllib.request.urlopen(request, context=ctx, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""


def test_shipped_example_serves_mutual_tls_with_basic_auth(tls_exporter) -> None:
    pki, url, _ = tls_exporter
    good = context(pki, "client")
    status, body = wait_until(lambda: get(url + "/metrics", good), timeout=15, what="TLS up")
    assert status == 200 and "kvm_up 1.0" in body
    assert get(url + "/metrics", good, auth=None)[0] == 401
    assert get(url + "/metrics", good, auth="Basic " + base64.b64encode(b"x:y").decode())[0] == 401
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        get(url + "/metrics", context(pki, None))  # no client certificate
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        get(url + "/metrics", context(pki, "other-client"))  # signed by another CA


def test_bad_web_config_is_a_one_line_startup_error(tmp_path: Path) -> None:
    shutil.copy(EXAMPLE, tmp_path / "web-config.yml")  # its certificates are missing
    start = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvm_exporter",
            f"--web.listen-address=127.0.0.1:{free_port()}",
            f"--web.config.file={tmp_path / 'web-config.yml'}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1 and time.monotonic() - start < 30
    errors = [line for line in result.stderr.splitlines() if "level=error" in line]
    assert len(errors) == 1 and "web-config.yml: tls_server_config.cert_file" in errors[0]
    assert "Traceback" not in result.stderr
