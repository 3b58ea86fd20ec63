"""The benchmark's smoke mode runs end to end and its correctness checks hold (no speed assertions here)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parents[2]


def test_bench_smoke(tmp_path):
    committed = (ROOT / "bench" / "results.json").read_bytes()
    p = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke"],  # no --out: a temporary file
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )  # its own group: the Prefect server child goes with it
    try:
        log, _ = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    assert p.returncode == 0, log[-3000:]
    # It says how long it takes and where its results go; the committed results are untouched.
    (start,) = [line for line in log.splitlines() if line.startswith("[bench] smoke: expect ")]
    out = Path(start.split("results to ", 1)[1])
    assert (ROOT / "bench" / "results.json").read_bytes() == committed and out.parent != ROOT / "bench"
    assert "[bench] speed: round 1/1 c: " in log and "[bench] reader: starting at " in log  # progress per round
    res = json.loads(out.read_text())
    out.unlink()
    (speed,) = res["speed"].values()
    for method in ("a", "a_hf", "b", "c", "c_br", "d", "e_raw"):
        assert speed["tokens_per_s"][method] > 0, method
    check = speed["check"]
    assert check["c_vs_bridge_allclose"] and check["c_equals_d"] and check["e_equals_c"], check
    assert check["c_vs_unfiltered_run_with_cache_max_abs"] < 1e-4
    warm = res["warm_rerun"]
    assert (warm["shards_done"], warm["shards_missing"], warm["models_loaded"]) == (50, 0, 0)
    assert {r["codec"] for r in res["compression"]["rows"]} >= {"none", "zstd-1", "zstd-3"}
    assert set(res["several_hooks"]) == {"resid_post (hf-sdpa)", "attn.hook_z (bridge)"}
    assert res["pipeline_overhead"]["per_shard_ms"] is not None
    assert res["stats_cost"]["moments_alone_us_per_token"] > 0 and res["stats_cost"]["forward_with_stats_s"] > 0
    reader = res["reader"]  # reading back (issue 10): every configuration ran, and the shuffled epoch is the set's
    assert all(v > 0 for v in reader["GB_s"].values()) and reader["vs_floor_f32"]["floor_f32"] == 1.0
    assert reader["check"] == {"shuffled_epoch_sum_equals_the_sets": True, "rows_per_epoch": True}
    assert all(v > 0 for v in reader["s3"]["GB_s"].values())
