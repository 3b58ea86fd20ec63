"""The README's first command, as CI runs it: `make demo`, twice."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.prefect, pytest.mark.subprocess]  # `actcache extract` in a process of its own

ROOT = Path(__file__).resolve().parents[1]


def _demo(store: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-s", "-C", str(ROOT), "demo", f"DEMO_STORE={store}"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )


def test_make_demo_twice_second_run_skips_every_shard(tmp_path):
    store = tmp_path / "activations"
    first = _demo(store)
    assert first.returncode == 0, first.stderr[-3000:]
    lines = first.stdout.strip().splitlines()
    set_url = next(line for line in lines if line.startswith(str(store)))
    assert "blocks.1.hook_resid_post" in first.stdout and "complete" in first.stdout  # the `ls` table
    assert len(list(Path(set_url).glob("shards/*.safetensors"))) == 4
    stamps = {
        p: (p.stat().st_mtime_ns, p.read_bytes()) for p in store.rglob("*") if p.is_file() and p.name != "manifest.json"
    }

    second = _demo(store)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "4 of 4 shards already stored" in second.stderr
    # Nothing was computed again: every shard, record and token file is the very file the first run wrote.
    assert {
        p: (p.stat().st_mtime_ns, p.read_bytes()) for p in store.rglob("*") if p.is_file() and p.name != "manifest.json"
    } == stamps
