"""The wheel installs one top-level package: flows/ and tasks/ land inside actcache's namespace."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import depscache
import pytest

pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built once for this file from a copy of the tracked files: a build in the checkout leaves build/
    and an egg-info whose stale version importlib.metadata would find first."""
    tmp_path = tmp_path_factory.mktemp("wheel")
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
        timeout=900,
    )
    (built,) = tmp_path.glob("actcache-*.whl")
    return built


@pytest.mark.slow
def test_wheel_installs_only_actcache_with_flows_and_tasks_inside(wheel):
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


READS = """
import sys
import torch
import actcache
from importlib.util import find_spec

url = sys.argv[1]
assert find_spec("prefect") is None and find_spec("transformer_lens") is None and find_spec("transformers") is None
s = actcache.open_set(url)
ds = actcache.ActivationDataset(url, batch_size=64, shuffle_buffer=128, dtype=torch.float32, drop_bos=True)
rows = sum(len(b) for b in ds)
assert rows == ds.n_tokens == s.n_tokens - s.n_tokens // s.context_size, (rows, ds.n_tokens)
print("read", rows)
"""


@pytest.mark.slow
def test_the_wheel_reads_sets_without_the_extraction_extra(tmp_path, extracted_set, wheel):
    """A fresh venv (no system site-packages) with torch and the wheel, no extra: reading, verifying and shuffling
    work; `actcache extract` says in one line which extra to install."""
    run = dict(check=True, capture_output=True, text=True, timeout=900)
    # torch and the base requirements come installed, once per machine, in a folder the venv finds through a .pth
    # file (tests/depscache.py); pip installs the wheel and whatever of its requirements that folder lacks.
    venv = tmp_path / "venv"
    depscache.fresh_venv(venv, depscache.base_dependencies(depscache.TORCH))
    pip = [
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "-q",
        "--no-compile",
        "-c",
        str(ROOT / "constraints.txt"),
    ]
    subprocess.run([*pip, str(wheel)], **run)
    py, cli = str(venv / "bin" / "python"), str(venv / "bin" / "actcache")
    assert "read" in subprocess.run([py, "-c", READS, extracted_set], **run).stdout
    assert "all checksums match" in subprocess.run([cli, "verify", extracted_set], **run).stdout
    out = subprocess.run([cli, "shuffle", extracted_set, "--out", str(tmp_path / "shuffled")], **run).stdout
    assert "all checksums match" in subprocess.run([cli, "verify", out.split()[-1]], **run).stdout
    extract = subprocess.run([cli, "extract", "--max-tokens", "64"], capture_output=True, text=True, timeout=300)
    assert extract.returncode == 2 and extract.stdout == ""
    assert extract.stderr.count("\n") == 1 and "pip install 'actcache[extract]'" in extract.stderr
