"""pyproject.toml builds without setuptools warnings and ships every module and the category table.

The wheel is built from a copy of the project by the installed setuptools' own PEP 517 backend (what
`pip install -e .` runs, minus the download of an isolated build environment): offline, a few seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_BUILD = "import setuptools.build_meta as backend; print(backend.{hook}('dist'))"


def _build(tmp_path: Path, hook: str) -> tuple[str, Path]:
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    for package in ("model", "pipeline", "jobs"):
        shutil.copytree(ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", _BUILD.format(hook=hook)],
        cwd=project, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr, project / "dist" / done.stdout.strip().splitlines()[-1]


def test_wheel_builds_without_warnings_and_ships_the_category_table(tmp_path: Path) -> None:
    log, wheel = _build(tmp_path, "build_wheel")
    noise = [line for line in log.splitlines() if "Warning" in line or "deprecated" in line or "absent from" in line]
    assert noise == []
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "model/data/coco_panoptic_categories.json" in names
    assert "License-Expression: Apache-2.0" in metadata
    # every module of the three packages, sub-packages included (a folder missing from pyproject's list would
    # install a cluster whose workers cannot import it)
    sources = {
        str(path.relative_to(ROOT))
        for package in ("model", "pipeline", "jobs")
        for path in (ROOT / package).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert sorted(sources - names) == []


def test_editable_build_is_quiet_too(tmp_path: Path) -> None:
    log, _ = _build(tmp_path, "build_editable")
    assert [line for line in log.splitlines() if "Warning" in line or "deprecated" in line] == []
