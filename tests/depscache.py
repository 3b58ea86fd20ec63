"""The base install's dependencies (torch and pyproject's ``dependencies``, no extra) in one folder per machine,
for tests that install the wheel into a fresh venv (import as ``depscache``).

``base_dependencies(torch)`` installs them with ``pip install --target`` into ``<cache>/deps/<key>`` (the cache of
tests/modelcache.py), the key being the sha256 of the requirements, constraints.txt and the interpreter's version:
a new pin or requirement gives a new folder. A fresh venv that names the folder in a ``.pth`` file finds them
installed, and ``pip install WHEEL`` there installs actcache itself and whatever the folder lacks. Installing torch
and the rest took minutes in every session; now once per machine. Built in a temporary folder and renamed into
place under a lock, so sessions that run at once (or xdist workers) share one build.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from modelcache import cache_root

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
TORCH = "torch==2.13.0"  # the CPU wheel (Makefile): a bare torch requirement would pull a CUDA build


def requirements(torch: str) -> list[str]:
    """``torch`` (a pinned requirement: a bare one would pull a CUDA build) and the base install's requirements."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [torch, *(d for d in deps if not d.replace(" ", "").startswith(("torch>", "torch=", "torch<")))]


def key(torch: str) -> str:
    h = hashlib.sha256(json.dumps({"requirements": requirements(torch), "python": sys.version}).encode())
    h.update(CONSTRAINTS.read_bytes())
    return h.hexdigest()[:16]


def base_dependencies(torch: str, timeout: float = 1800) -> Path:
    """The folder holding ``requirements(torch)`` installed with constraints.txt; installed on first use."""
    root = cache_root() / "deps"
    root.mkdir(parents=True, exist_ok=True)
    out = root / key(torch)
    with open(root / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if out.is_dir():
            return out
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            target = Path(tmp) / "site"
            pip = [sys.executable, "-m", "pip", "install", "-q", "--no-compile", "--target", str(target)]
            pip += ["-c", str(CONSTRAINTS)]  # --no-compile: seconds, not a minute; programs compile what they import
            subprocess.run([*pip, *requirements(torch)], check=True, capture_output=True, text=True, timeout=timeout)
            os.rename(target, out)  # last: a folder that is there is complete
    return out


def fresh_venv(path: Path, deps: Path) -> Path:
    """A new venv at ``path`` (no system site-packages) that finds ``deps`` on its path; its python."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, capture_output=True, timeout=600)
    [site] = path.glob("lib/python*/site-packages")
    (site / "actcache_test_deps.pth").write_text(f"{deps}\n")
    return path / "bin" / "python"
