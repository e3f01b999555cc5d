"""Build the fake libkvm (``tests/fakekvm/fakekvm.c``) with ``cc``; a fixture builds it once.

Other test modules use it with ``from fakelib import fake_libkvm``.
"""

from __future__ import annotations

import pathlib
import subprocess

import pytest

FAKEKVM_DIR = pathlib.Path(__file__).resolve().parent / "fakekvm"
SCENARIOS = FAKEKVM_DIR / "scenarios"
CFLAGS = ["-O2", "-Wall", "-Werror", "-shared", "-fPIC"]


def build_fake_libkvm(out_dir: pathlib.Path) -> pathlib.Path:
    """Compile the fake into ``out_dir/libfakekvm.so`` and return its path."""
    out = out_dir / "libfakekvm.so"
    cmd = ["cc", *CFLAGS, "-o", str(out), str(FAKEKVM_DIR / "fakekvm.c")]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr}")
    return out


@pytest.fixture(scope="session")
def fake_libkvm(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Path of the fake libkvm shared library, built once per test session."""
    return build_fake_libkvm(tmp_path_factory.mktemp("fakekvm"))
