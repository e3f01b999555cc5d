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
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py


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


setup(ext_modules=_extensions(), cmdclass={"build_py": BuildPyWithRevision})
