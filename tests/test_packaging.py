"""The FreeBSD port skeleton (packaging/freebsd), the wheel and the sdist.

The wheel and sdist are built once with ``python -m build`` (its isolated build environment
comes from the package index). Nothing here runs on FreeBSD: the port is checked against the
repository and the built distributions, not built with the ports tree.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest
import tomllib
from test_manpage import mandoc_lint

REPO = Path(__file__).resolve().parent.parent
PORT = REPO / "packaging" / "freebsd"
RC_IN = PORT / "files" / "kvm_exporter.in"
RC_D = REPO / "rc.d" / "kvm_exporter"
MAN_PAGE = "share/man/man8/kvm_exporter.8"
"""Where the wheel's data puts the manual, relative to the prefix: FreeBSD ports install
manuals under ${PREFIX}/share/man, so the port's autoplist (the wheel's RECORD) has it there."""
MAN_SOURCE = REPO / "packaging" / "kvm_exporter.8"

PORTS = {
    "bcrypt": ("security/py-bcrypt", "bcrypt"),
    "cffi": ("devel/py-cffi", "cffi"),
    "google-re2": ("devel/py-google-re2", "google-re2"),
    "prometheus_client": ("net-mgmt/py-prometheus-client", "prometheus-client"),
    "PyYAML": ("devel/py-pyyaml", "pyyaml"),
    "setuptools": ("devel/py-setuptools", "setuptools"),
}
"""The FreeBSD port of each PyPI project the port depends on: its origin and its PORTNAME
(the package is ${PYTHON_PKGNAMEPREFIX}PORTNAME, e.g. py311-pyyaml), as read in
freebsd/freebsd-ports: security/py-bcrypt/Makefile at 2c43c071, devel/py-cffi/Makefile at
39f21abd, devel/py-google-re2/Makefile at 966ecd67, net-mgmt/py-prometheus-client/Makefile at
6f0d28be, devel/py-pyyaml/Makefile at a029be09, devel/py-setuptools/Makefile at 32e58a9d."""

MOVED = {"devel/py-yaml": "devel/py-pyyaml"}
"""Origins the ports tree has moved (MOVED at 00007dfa8db4:
``devel/py-yaml|devel/py-pyyaml|2024-07-07|Move devel/py-yaml to devel/py-pyyaml``): a
dependency on the old origin is never met, as the package it names is no longer built."""

DEPENDS_ENTRY = re.compile(
    r"\$\{PYTHON_PKGNAMEPREFIX\}([a-z0-9-]+)>([=0-9.]+):([a-z0-9-]+/[a-z0-9-]+)@\$\{PY_FLAVOR\}"
)
"""One flavoured dependency: package name, ``=MINIMUM`` or ``0``, origin."""

README = REPO / "README.md"


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


@pytest.mark.parametrize("script", ["make-rc-in.sh", "check-port.sh"])
def test_packaging_scripts_pass_shellcheck(script: str) -> None:
    # check-port.sh runs by hand against a ports tree (README, FreeBSD, Port); here it is at
    # least read by shellcheck, as the rc.d script is.
    result = subprocess.run(
        ["shellcheck", "--severity=style", str(REPO / "packaging" / script)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


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


def minimums(requirements: list[str]) -> dict[str, str]:
    """``{PyPI name: minimum version}`` of PEP 508 requirements ``NAME>=X[; marker]``."""
    found = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)(;.*)?", requirement)
        assert match, f"requirement without a minimum version: {requirement}"
        found[match.group(1)] = match.group(2)
    return found


def port_depends(entries: str) -> dict[str, str]:
    """``{PyPI name: minimum version}`` of the value of a *_DEPENDS variable, each entry
    checked against the origin and package name the ports tree has for it (PORTS)."""
    origins = {origin: (pypi, name) for pypi, (origin, name) in PORTS.items()}
    found = {}
    for entry in entries.split():
        match = DEPENDS_ENTRY.fullmatch(entry)
        assert match, f"entry not in the flavoured form: {entry}"
        name, minimum, origin = match.groups()
        assert origin not in MOVED, f"{origin} has moved to {MOVED.get(origin)}"
        assert origin in origins, f"{origin}: no such port in the facts read (PORTS)"
        pypi, portname = origins[origin]
        assert name == portname, f"{origin} builds {portname}, not {name}"
        found[pypi] = minimum.removeprefix("=")
    return found


def test_port_dependency_check_refuses_a_moved_or_misnamed_origin() -> None:
    moved = "${PYTHON_PKGNAMEPREFIX}yaml>=5.4:devel/py-yaml@${PY_FLAVOR}"
    misnamed = "${PYTHON_PKGNAMEPREFIX}yaml>=5.4:devel/py-pyyaml@${PY_FLAVOR}"
    for entry, error in ((moved, "has moved to devel/py-pyyaml"), (misnamed, "not yaml")):
        with pytest.raises(AssertionError, match=error):
            port_depends(entry)


def test_port_run_depends_are_the_package_dependencies() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert port_depends(PORT_VARS["RUN_DEPENDS"]) == minimums(pyproject["project"]["dependencies"])


def test_port_build_depends_are_the_build_requirements() -> None:
    # setuptools >= 77 reads pyproject's SPDX ``license`` and ``license-files``. cffi is a
    # build requirement on Linux only (pip would build it from source on FreeBSD), but the
    # port has it as a package, and setup.py then builds the C gather of kinfo_proc records.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = minimums(pyproject["build-system"]["requires"])
    assert wanted["setuptools"] == "77"
    assert port_depends(PORT_VARS["BUILD_DEPENDS"]) == wanted


def test_readme_pip_route_installs_pip_and_every_dependency_as_a_package() -> None:
    # pip comes in a package of its own, py3XX-pip (devel/py-pip, PORTNAME=pip, at e9fefdb2).
    freebsd = README.read_text().split("\n## FreeBSD\n")[1]
    (line,) = re.findall(r"^ *(pkg install python3\d+ .*)$", freebsd, re.M)
    words = line.split()
    python = words[2].removeprefix("python")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = {
        f"py{python}-{PORTS[name][1]}" for name in minimums(pyproject["project"]["dependencies"])
    }
    assert set(words[3:]) == wanted | {f"py{python}-pip"}
    assert f"python{python[0]}.{python[1:]} -m pip install kvm_exporter" in freebsd


def test_port_builds_one_flavor_per_python_without_concurrent() -> None:
    # USE_PYTHON=concurrent (Mk/Uses/python.mk at 008c7801) makes flavours installable side by side
    # by renaming bin/kvm_exporter to bin/kvm_exporter-3.X (uniquefiles), but each flavour
    # would still install the same rc.d script, sample config and user: they conflict, and
    # the rc.d script's %%PREFIX%%/bin/kvm_exporter is only a link for the default flavour.
    assert PORT_VARS["USE_PYTHON"].split() == ["autoplist", "pep517"]
    assert "%%PREFIX%%/bin/kvm_exporter" in RC_IN.read_text()


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
    # Outside the port %%PREFIX%% is /usr/local (setup.py), the README's pip route.
    assert man == MAN_SOURCE.read_text().replace("%%PREFIX%%", "/usr/local")
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


def port_post_patch(wrksrc: Path, prefix: str) -> Path:
    """Runs the port's one-line post-patch recipe in ``wrksrc`` with ``prefix`` as PREFIX and
    REINPLACE_CMD as sed -i (Mk/bsd.commands.mk); returns the file it edits."""
    recipe = re.search(r"^post-patch:\n\t@?(.*)\n(?!\t)", (PORT / "Makefile").read_text(), re.M)
    assert recipe, "no one-line post-patch target"
    command, *expressions, target = shlex.split(recipe.group(1))
    assert command == "${REINPLACE_CMD}" and target.startswith("${WRKSRC}/")
    edited = wrksrc / target.removeprefix("${WRKSRC}/")
    expressions = [word.replace("${PREFIX}", prefix) for word in expressions]
    subprocess.run(["sed", "-i", *expressions, str(edited)], check=True)
    return edited


def test_port_writes_its_prefix_into_the_manual(tmp_path: Path) -> None:
    # USE_RC_SUBR substitutes %%PREFIX%% in the rc.d script; the manual is wheel data, so the
    # port substitutes it in ${WRKSRC} before the build.
    page = tmp_path / MAN_SOURCE.relative_to(REPO)
    page.parent.mkdir()
    page.write_text(MAN_SOURCE.read_text())
    assert port_post_patch(tmp_path, "/opt/pkg") == page
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["data-files"]["share/man/man8"] == [
        str(page.relative_to(tmp_path))
    ]
    installed = page.read_text()
    assert "%%" not in installed
    assert "\n.It Pa /opt/pkg/etc/kvm_exporter.yml\n" in installed
    assert mandoc_lint(page) == []


def test_port_builds_the_sdist_with_its_build_depends(
    dists: dict[str, Path], tmp_path: Path
) -> None:
    """The port's build on Linux: the sdist after post-patch, built by Mk/Uses/python.mk's
    PEP517_BUILD_CMD (``python -m build --no-isolation --wheel``) where only BUILD_DEPENDS and
    py-build are installed. ``build`` checks the build requirements itself; a setuptools
    older than 77 refuses pyproject's SPDX ``license``."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = str(env_dir / "bin" / "python")
    env = {**os.environ, "PIP_NO_CACHE_DIR": "1"}
    env.pop("PYTHONPATH", None)
    depends = port_depends(PORT_VARS["BUILD_DEPENDS"])
    wanted = [f"{name}>={minimum}" for name, minimum in depends.items()]
    pip = [python, "-m", "pip", "install", "-q", "build", *wanted]
    install = subprocess.run(pip, capture_output=True, text=True, env=env, timeout=300)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    with tarfile.open(dists["sdist"]) as tar:
        tar.extractall(tmp_path)
    wrksrc = tmp_path / dists["sdist"].name.removesuffix(".tar.gz")
    port_post_patch(wrksrc, "/opt/pkg")
    out = tmp_path / "dist"
    build = [python, "-m", "build", "--no-isolation", "--wheel", "--outdir", str(out), str(wrksrc)]
    built = subprocess.run(build, capture_output=True, text=True, env=env, timeout=300)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    version = source_version()
    with zipfile.ZipFile(wheel) as whl:
        man = whl.read(f"kvm_exporter-{version}.data/data/{MAN_PAGE}").decode()
    assert "%%" not in man and "/usr/local" not in man
    assert "\n.It Pa /opt/pkg/etc/rc.d/kvm_exporter\n" in man
    # cffi came from BUILD_DEPENDS: the optional C loops were built.
    assert any("/_procscan" in name for name in wheel_record(wheel))


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
