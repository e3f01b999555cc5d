"""The README's copy-paste commands, run for real: the quick start's install and unprivileged
run (past its apt-get, whose packages tests/run.sh installs), and the bcrypt line of "TLS and
basic auth", whose hash the exporter's basic auth then accepts."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from attack_support import NOBODY, world_dir
from conftest import REPO, free_port, wrapped_exporter_reads
from test_web import basic, get, hello

from kvm_exporter.web import serve
from kvm_exporter.webconfig import load_web_config

README = (REPO / "README.md").read_text()
VENV = "/opt/kvm_exporter"
"""Where the README installs the exporter (and the systemd unit runs it)."""


def section(heading: str) -> str:
    """The text under ``heading`` (a whole line) up to the next heading of its level."""
    start = README.index(f"\n{heading}\n")
    level = heading.split()[0]
    end = README.find(f"\n{level} ", start + 1)
    return README[start : end if end > 0 else len(README)]


def first_sh_line(text: str) -> str:
    """The one line of the first ``sh`` block of ``text``."""
    found = re.search(r"```sh\n(.*?)\n```", text, re.S)
    assert found and "\n" not in found.group(1), "one copy-paste line"
    return found.group(1)


def run_sh_packages() -> set[str]:
    script = (REPO / "tests" / "run.sh").read_text()
    found = re.search(r'^PACKAGES="([^"]*)"', script, re.M)
    assert found
    return set(found.group(1).split())


def test_quick_start_installs_and_runs_the_exporter_unprivileged() -> None:
    """As root, from a clone only root can read (as under /root), into a venv every user can
    run: the exporter serves as nobody and does not warn that it runs as root."""
    apt, *steps = first_sh_line(section("## Quick start")).split(" && ")
    assert apt.startswith("apt-get install -y ")
    assert set(apt.split()[3:]) <= run_sh_packages()  # so installed here already
    assert steps[-1] == f"runuser -u nobody -- {VENV}/bin/kvm_exporter"
    with world_dir() as tmp:
        private = tmp / "root"
        private.mkdir(mode=0o700)
        clone = private / "kvm_exporter"
        ignore = shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "*.so")
        shutil.copytree(REPO, clone, ignore=ignore)
        venv = str(tmp / "venv")
        install = " && ".join(steps[:-1]).replace(VENV, venv)
        done = subprocess.run(
            ["sh", "-c", install], cwd=clone, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stdout + done.stderr
        port = free_port()
        run = shlex.split(steps[-1].replace(VENV, venv)) + [
            f"--web.listen-address=127.0.0.1:{port}"
        ]
        stderr = tmp / "stderr"
        with stderr.open("wb") as err:
            runuser = subprocess.Popen(run, cwd=clone, stderr=err)
        status = wrapped_exporter_reads(runuser, port, "status")
        assert f"Uid:\t{NOBODY}\t{NOBODY}\t" in status
        log = stderr.read_text()
        assert 'msg="listening"' in log and "running as root" not in log, log


def test_readme_bcrypt_line_makes_a_hash_basic_auth_accepts(tmp_path: Path) -> None:
    """The line that replaces htpasswd, run with the Python the exporter runs on (the README
    names the venv's): its hash in basic_auth_users admits that password and no other."""
    tls = section("## TLS and basic auth")
    line = first_sh_line(tls[tls.index("basic_auth_users:") :])
    assert line.startswith(f"{VENV}/bin/python -c ")
    # A new session has no terminal: getpass reads the password from stdin (and warns).
    done = subprocess.run(
        [sys.executable, *shlex.split(line)[1:]],
        input="correct horse\n",
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
    )
    assert done.returncode == 0, done.stderr
    (hashed,) = done.stdout.split()
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  prometheus: {hashed}\n")
    server = serve(hello, "127.0.0.1:0", load_web_config(str(web)))
    try:
        assert get(server, headers=basic("prometheus", "correct horse"))[0] == 200
        assert get(server, headers=basic("prometheus", "correct horse "))[0] == 401
    finally:
        server.shutdown()
