"""`make setup` reinstalls when the dependencies change, whatever the file times say.

The venv stamp used to be one file compared by mtime with pyproject.toml. A venv copied with hard
links (or restored from a cache) carries a stamp newer than a later merge's pyproject.toml, and the
new dependencies were never installed: opentelemetry-sdk went missing that way and its tests
skipped. The stamp's name now carries a digest of pyproject.toml and setup.py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def plan(tree: Path) -> str:
    """What `make setup` would run there (dry run: nothing is installed)."""
    return subprocess.run(["make", "-n", "setup"], cwd=tree, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="`make` is not on PATH")
def test_a_dependency_change_reinstalls_even_behind_a_newer_stamp(tmp_path):
    for f in ("Makefile", "pyproject.toml", "setup.py"):
        shutil.copy(ROOT / f, tmp_path / f)
    shutil.copytree(ROOT / "requirements", tmp_path / "requirements")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    first = plan(tmp_path)
    assert "pip install" in first, first
    stamp = next(line.split()[-1] for line in first.splitlines() if line.startswith("touch "))
    (tmp_path / stamp).touch()
    assert "pip install" not in plan(tmp_path), "an installed, unchanged venv is not set up again"

    # A merge brings a dependency, and the stamp is still newer than the changed file.
    with open(tmp_path / "pyproject.toml", "a") as f:
        f.write("\n# a new dependency arrives here\n")
    future = (tmp_path / "pyproject.toml").stat().st_mtime + 3600
    os.utime(tmp_path / stamp, (future, future))
    assert "pip install" in plan(tmp_path)

    # `make lock` changes a pinned version: the lock is part of the stamp too.
    (tmp_path / stamp).touch()
    stamp2 = next(line.split()[-1] for line in plan(tmp_path).splitlines() if line.startswith("touch "))
    (tmp_path / stamp2).touch()
    assert "pip install" not in plan(tmp_path)
    with open(tmp_path / "requirements" / "lock.txt", "a") as f:
        f.write("\n# a pin moves here\n")
    assert "-r requirements/lock.txt" in plan(tmp_path)
