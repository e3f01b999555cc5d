"""Adds the optional compiled /proc census (cffi API mode); everything else is in pyproject.toml.

Without a compiler or Python's headers the extension is skipped (``optional``) and the
exporter uses its pure-Python path. The builder is loaded by file path: the package's own
dependencies do not exist yet at build time.
"""

import importlib.util
import os

from setuptools import setup

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "procscan_build", os.path.join(_HERE, "kvm_exporter", "sources", "procscan_build.py")
)
assert _spec is not None and _spec.loader is not None
_builder = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_builder)

# The generated C goes under build/ (relative: setuptools wants sources inside the project).
_ext = _builder.ffibuilder.distutils_extension(os.path.join("build", "cffi"), verbose=False)
_ext.optional = True

setup(ext_modules=[_ext])
