"""Adds the optional compiled /proc census (cffi API mode); everything else is in pyproject.toml.

Linux only: it reads /proc, and FreeBSD installs stay compiler-free. Without a compiler or
Python's headers the extension is skipped (``optional``) and the exporter uses its
pure-Python path. The builder is loaded by file path: the package's own dependencies do not
exist yet at build time.
"""

import importlib.util
import os
import sys

from setuptools import setup


def _extensions() -> list[object]:
    if not sys.platform.startswith("linux"):
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


setup(ext_modules=_extensions())
