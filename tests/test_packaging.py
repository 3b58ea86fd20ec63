"""The wheel installs one top-level package: flows/ and tasks/ land inside actcache's namespace."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_only_actcache_with_flows_and_tasks_inside(tmp_path):
    # Built from a copy of the tracked files: a build in the checkout leaves build/ and an egg-info whose stale
    # version importlib.metadata would find first.
    src = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for rel in tracked.split():
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("actcache-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (top,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert z.read(top).decode().split() == ["actcache"]
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"actcache"}
    for sub in ("flows/extract.py", "flows/fanout.py", "tasks/upload.py", "extraction/forward.py", "cli/app.py"):
        assert f"actcache/{sub}" in names, sub
    # Every subpackage in the source tree is in the wheel (the package list in pyproject is written out by hand).
    for init in (ROOT / "actcache").glob("*/__init__.py"):
        assert f"actcache/{init.parent.name}/__init__.py" in names, init.parent.name
