"""Adds the optional compiled loops (cffi API mode); everything else is in pyproject.toml.

Linux and FreeBSD: the /proc census on the one, the gather of kinfo_proc records on the
other (the C knows no FreeBSD header). Without a compiler or Python's headers the extension
is skipped (``optional``) and the exporter uses its pure-Python path, so an install needs no
compiler. On FreeBSD cffi is not a build requirement (pip would compile cffi itself in its
isolated build environment): the extension is built where cffi is already there, as in the
port (``BUILD_DEPENDS``) or with ``pip install --no-build-isolation``. The builder is loaded
by file path: the package's own dependencies do not exist yet at build time.
"""

import importlib.util
import os
import sys
from typing import Any

from setuptools import setup
from setuptools.command.build_py import build_py


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


setup(ext_modules=_extensions(), cmdclass={"build_py": BuildPyWithRevision})
