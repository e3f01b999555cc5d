"""Project files: the licence matches pyproject.toml, the build prints no deprecation warning,
the changelog names the current version and the tag scheme."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib
from conftest import REPO

import kvm_exporter

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_license_file_is_the_bsd_2_clause_text_pyproject_names() -> None:
    assert PYPROJECT["project"]["license"] == "BSD-2-Clause"  # SPDX string, not a table
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("BSD 2-Clause License\n")
    assert "1. Redistributions of source code" in text
    assert "2. Redistributions in binary form" in text
    assert "3. " not in text  # no third (non-endorsement) clause: that is BSD-3-Clause


def test_wheel_builds_without_warnings_and_carries_the_license(tmp_path: Path) -> None:
    # A copy: building in the checkout would write build/ under other tests' feet.
    src = tmp_path / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", ".venv*"),
    )
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "deprecat" not in output.lower(), output
    assert "BuildBackendWarning" not in output, output
    (wheel,) = tmp_path.glob("kvm_exporter-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: BSD-2-Clause" in metadata
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names


def test_changelog_has_the_current_version_and_the_tag_scheme() -> None:
    text = (REPO / "CHANGELOG.md").read_text()
    assert PYPROJECT["project"]["dynamic"] == ["version"]  # read from __version__ only
    version = kvm_exporter.__version__
    assert "## [Unreleased]" in text
    assert re.search(rf"^## \[{re.escape(version)}\] - \d{{4}}-\d\d-\d\d$", text, re.M)
    assert "`vX.Y.Z`" in text
