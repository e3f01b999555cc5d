"""The FreeBSD port skeleton (packaging/freebsd), the wheel and the sdist.

The wheel and sdist are built once with ``python -m build`` (its isolated build environment
comes from the package index). Nothing here runs on FreeBSD: the port is checked against the
repository and the built distributions, not built with the ports tree.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parent.parent
PORT = REPO / "packaging" / "freebsd"
RC_IN = PORT / "files" / "kvm_exporter.in"
RC_D = REPO / "rc.d" / "kvm_exporter"
MAN_PAGE = "share/man/man8/kvm_exporter.8"
"""Where the wheel's data puts the manual, relative to the prefix: FreeBSD ports install
manuals under ${PREFIX}/share/man, so the port's autoplist (the wheel's RECORD) has it there."""

PORT_NAMES = {"prometheus_client": "prometheus-client", "PyYAML": "yaml"}
"""PyPI names whose FreeBSD port (py-NAME) is named differently."""


def source_version() -> str:
    """``__version__`` as written in kvm_exporter/__init__.py (read, not imported)."""
    tree = ast.parse((REPO / "kvm_exporter" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "__version__":
            return str(ast.literal_eval(node.value))
    raise AssertionError("kvm_exporter/__init__.py sets no __version__")


def make_variables(text: str) -> dict[str, str]:
    """``NAME=value`` assignments of a port Makefile, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    found = re.findall(r"^([A-Z_]+)=\s*(.*)$", joined, re.MULTILINE)
    return {name: " ".join(value.split()) for name, value in found}


PORT_VARS = make_variables((PORT / "Makefile").read_text())


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sdist and the wheel ``python -m build`` makes from a copy of the repository."""
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


def wheel_record(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as whl:
        (record,) = (n for n in whl.namelist() if n.endswith(".dist-info/RECORD"))
        return [line.split(",")[0] for line in whl.read(record).decode().splitlines()]


def sdist_names(sdist: Path) -> set[str]:
    with tarfile.open(sdist) as tar:
        return {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}


# --- the port's rc.d script ---


def test_port_rc_script_is_generated_from_the_repository_one() -> None:
    generated = subprocess.run(
        [str(REPO / "packaging" / "make-rc-in.sh")], capture_output=True, text=True, check=True
    ).stdout
    assert generated == RC_IN.read_text(), (
        "packaging/freebsd/files/kvm_exporter.in is stale: run "
        "packaging/make-rc-in.sh > packaging/freebsd/files/kvm_exporter.in"
    )
    assert "/usr/local" not in generated
    assert generated.replace("%%PREFIX%%", "/usr/local") == RC_D.read_text()


def test_port_rc_script_passes_shellcheck_under_another_prefix(tmp_path: Path) -> None:
    # USE_RC_SUBR substitutes the port's PREFIX; a non-default one must give a clean script.
    script = tmp_path / "kvm_exporter"
    text = RC_IN.read_text().replace("%%PREFIX%%", "/opt/pkg")
    assert "%%" not in text, "the .in uses a substitution other than %%PREFIX%%"
    script.write_text(text)
    result = subprocess.run(
        ["shellcheck", "--shell=sh", "--severity=style", str(script)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r'kvm_exporter_command:?="?/opt/pkg/bin/kvm_exporter"?}', text)


# --- the port's Makefile against the project ---


def test_port_version_is_the_package_version() -> None:
    assert PORT_VARS["DISTVERSION"] == source_version()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    # One place: pyproject reads it from the package, so the two cannot drift apart.
    assert "version" not in pyproject["project"]
    assert pyproject["project"]["dynamic"] == ["version"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "kvm_exporter.__version__"
    }


def test_port_python_versions_are_the_package_ones() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    minimum = pyproject["project"]["requires-python"].removeprefix(">=")
    assert PORT_VARS["USES"] == f"python:{minimum}+"


def test_port_substitutes_every_file_it_names() -> None:
    for name in PORT_VARS["SUB_FILES"].split():
        text = (PORT / "files" / f"{name}.in").read_text()
        assert set(re.findall(r"%%(\w+)%%", text)) <= {"PREFIX"}, name
    assert "%%PREFIX%%/etc/kvm_exporter.yml" in (PORT / "files" / "pkg-message.in").read_text()


def test_port_run_depends_are_the_package_dependencies() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = {}
    for requirement in pyproject["project"]["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement)
        assert match, f"dependency without a minimum version: {requirement}"
        name, minimum = match.groups()
        wanted[PORT_NAMES.get(name, name)] = minimum
    found = {}
    for dep in PORT_VARS["RUN_DEPENDS"].split():
        match = re.fullmatch(
            r"\$\{PYTHON_PKGNAMEPREFIX\}([a-z0-9-]+)>=([0-9.]+):[a-z-]+/py-([a-z0-9-]+)@\$\{PY_FLAVOR\}",
            dep,
        )
        assert match, f"RUN_DEPENDS entry not in the flavoured form: {dep}"
        name, minimum, port = match.groups()
        assert name == port
        found[name] = minimum
    assert found == wanted


def test_port_installs_the_rc_script_as_the_service_user_it_creates() -> None:
    assert PORT_VARS["USE_RC_SUBR"] == "kvm_exporter"
    assert (PORT / "files" / f"{PORT_VARS['USE_RC_SUBR']}.in").is_file()
    user = re.search(r'kvm_exporter_user:?="?([^}"]+)', RC_D.read_text())
    group = re.search(r'kvm_exporter_group:?="([^}"]*)', RC_D.read_text())
    assert user and group
    assert PORT_VARS["USERS"] == user.group(1)
    # An empty group default is the user's login group, which the port creates by that name.
    assert PORT_VARS["GROUPS"] == (group.group(1) or user.group(1))
    assert "@sample etc/kvm_exporter.yml.sample" in PORT_VARS["PLIST_FILES"]
    default_config = re.search(r'kvm_exporter_config:?="?%%PREFIX%%/([^}"]+)', RC_IN.read_text())
    assert default_config and default_config.group(1) == "etc/kvm_exporter.yml"


def test_port_installs_what_the_wheel_and_sdist_carry(dists: dict[str, Path]) -> None:
    # autoplist takes the wheel's RECORD: the manual must be wheel data under share/man.
    record = wheel_record(dists["wheel"])
    version = source_version()
    assert f"kvm_exporter-{version}.data/data/{MAN_PAGE}" in record
    with zipfile.ZipFile(dists["wheel"]) as whl:
        man = whl.read(f"kvm_exporter-{version}.data/data/{MAN_PAGE}").decode()
        entry_points = whl.read(f"kvm_exporter-{version}.dist-info/entry_points.txt").decode()
    assert man == (REPO / "packaging" / "kvm_exporter.8").read_text()
    assert "kvm_exporter = kvm_exporter.cli:main" in entry_points
    # The port builds from the sdist (MASTER_SITES=PYPI, DISTNAME kvm_exporter-VERSION) and
    # copies files out of ${WRKSRC}: each must be in it, and equal to the repository's.
    assert dists["sdist"].name == f"{PORT_VARS['PORTNAME']}-{PORT_VARS['DISTVERSION']}.tar.gz"
    names = sdist_names(dists["sdist"])
    makefile = (PORT / "Makefile").read_text()
    copied = re.findall(r"\$\{WRKSRC\}/(\S+)", makefile)
    assert "config/kvm_exporter.yml" in copied
    assert set(copied) <= names, "the port reads files the sdist lacks (MANIFEST.in)"
    assert {"rc.d/kvm_exporter", "packaging/freebsd/files/kvm_exporter.in"} <= names


# --- the wheel and the sdist ---


def test_twine_accepts_the_wheel_and_the_sdist(dists: dict[str, Path]) -> None:
    twine = Path(sys.executable).parent / "twine"
    result = subprocess.run(
        [str(twine), "check", "--strict", str(dists["sdist"]), str(dists["wheel"])],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("PASSED") == 2


def test_wheel_metadata_has_the_package_version(dists: dict[str, Path]) -> None:
    with zipfile.ZipFile(dists["wheel"]) as whl:
        (meta,) = (n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = whl.read(meta).decode()
    assert f"\nVersion: {source_version()}\n" in metadata


def test_sdist_installs_and_runs_without_a_compiler(dists: dict[str, Path], tmp_path: Path) -> None:
    """A FreeBSD-like install: no C compiler. The optional census is skipped, the rest works."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    env = {**os.environ, "CC": "/bin/false", "CXX": "/bin/false", "PIP_NO_CACHE_DIR": "1"}
    env.pop("PYTHONPATH", None)
    install = subprocess.run(
        [str(env_dir / "bin" / "pip"), "install", "-q", str(dists["sdist"])],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    assert not list((site / "kvm_exporter" / "sources").glob("_procscan*")), (
        "the C census was built although CC=/bin/false"
    )
    assert (env_dir / "share" / "man" / "man8" / "kvm_exporter.8").is_file()

    def exporter(*args: str) -> subprocess.CompletedProcess[str]:
        command = [str(env_dir / "bin" / "kvm_exporter"), *args]
        return subprocess.run(command, capture_output=True, text=True, cwd="/", env=env, timeout=60)

    helped = exporter("--help")
    assert helped.returncode == 0, helped.stderr
    assert "--web.listen-address" in helped.stdout
    once = exporter("--once")  # the pure-Python census on this machine's /proc
    assert once.returncode == 0, once.stderr
    assert "\nkvm_up 1.0\n" in once.stdout
