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
import sys
from typing import Any

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

MAN_PREFIX = "/usr/local"
"""What ``%%PREFIX%%`` in the manual becomes outside the port."""


def _extensions() -> list[object]:
    if not sys.platform.startswith(("linux", "freebsd")):
        return []
    if sys.platform.startswith("freebsd") and importlib.util.find_spec("cffi") is None:
        return []
    builder = _load("sources/procscan_build")
    # The generated C goes under build/ (relative: setuptools wants sources inside the project).
    ext = builder.ffibuilder.distutils_extension(os.path.join("build", "cffi"), verbose=False)
    ext.optional = True
    return [ext]


def _load(name: str) -> Any:
    """A module of the package by file path: its dependencies do not exist yet at build time."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "kvm_exporter", *name.split("/")) + ".py"
    spec = importlib.util.spec_from_file_location(os.path.basename(name), path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithRevision(build_py):
    """Also writes kvm_exporter/revision.txt: the git commit built from, for --version."""

    def run(self) -> None:
        super().run()
        here = os.path.dirname(os.path.abspath(__file__))
        commit = _load("gitrevision").checkout_revision(here)
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
