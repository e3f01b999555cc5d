"""Adds the optional compiled loops (cffi API mode); everything else is in pyproject.toml.

Linux and FreeBSD: the /proc census on the one, the gather of kinfo_proc records on the
other (the C knows no FreeBSD header). Without a compiler or Python's headers the extension
is skipped (``optional``) and the exporter uses its pure-Python path, so an install needs no
compiler. On FreeBSD cffi is not a build requirement (pip would compile cffi itself in its
isolated build environment): the extension is built where cffi is already there, as in the
port (``BUILD_DEPENDS``) or with ``pip install --no-build-isolation``. The builder is loaded
by file path: the package's own dependencies do not exist yet at build time.

The manual's paths are written ``%%PREFIX%%/...`` for the FreeBSD port, which substitutes its
PREFIX before it builds (``post-patch``); any other build writes /usr/local, FreeBSD's default
prefix, where the README's pip route puts the rc.d script and the configuration.
"""

import importlib.util
import os
import subprocess
import sys

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

MAN_PREFIX = "/usr/local"
"""What ``%%PREFIX%%`` in the manual becomes outside the port."""


def _extensions() -> list[object]:
    if not sys.platform.startswith(("linux", "freebsd")):
        return []
    if sys.platform.startswith("freebsd") and importlib.util.find_spec("cffi") is None:
        return []
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location(
        "procscan_build", os.path.join(here, "kvm_exporter", "sources", "procscan_build.py")
    )
    assert spec is not None and spec.loader is not None
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    # The generated C goes under build/ (relative: setuptools wants sources inside the project).
    ext = builder.ffibuilder.distutils_extension(os.path.join("build", "cffi"), verbose=False)
    ext.optional = True
    return [ext]


def _git(*args: str) -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        done = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


class BuildPyWithRevision(build_py):
    """Also writes kvm_exporter/revision.txt: the git commit built from, for --version."""

    def run(self) -> None:
        super().run()
        top = _git("rev-parse", "--show-toplevel")  # not a checkout this tree sits inside
        here = os.path.dirname(os.path.abspath(__file__))
        commit = _git("rev-parse", "HEAD") if top and os.path.samefile(top, here) else ""
        if commit and _git("status", "--porcelain", "--untracked-files=no"):
            commit += "-dirty"
        path = os.path.join(self.build_lib, "kvm_exporter", "revision.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write((commit or "unknown") + "\n")


install_data = Distribution().get_command_class("install_data")  # setuptools has none of its own


class InstallDataWithPrefix(install_data):
    """Installs the manual with ``%%PREFIX%%`` replaced by MAN_PREFIX."""

    def run(self) -> None:
        super().run()
        for path in self.get_outputs():
            if path.endswith(".8"):
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text.replace("%%PREFIX%%", MAN_PREFIX))


setup(
    ext_modules=_extensions(),
    cmdclass={"build_py": BuildPyWithRevision, "install_data": InstallDataWithPrefix},
)
