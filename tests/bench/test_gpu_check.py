"""bench/gpu_check.py: without CUDA it says so in one line and exits NO_CUDA; its checks cover every CUDA path,
and their steps run end to end on the CPU (--rehearse), so the first run on a GPU tests CUDA, not the plumbing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import gpu_check  # noqa: E402

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the real check applies")


def run(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    p = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )  # its own group: a Prefect server it starts goes with it
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@no_cuda
@pytest.mark.subprocess
@pytest.mark.parametrize("entry", [["bench/gpu_check.py"], ["bench/run.py", "--only", "gpu"]])
def test_without_cuda_one_line_and_its_own_exit_code(entry):
    res = run(*entry)
    assert res.returncode == gpu_check.NO_CUDA != 1, res.stderr
    assert res.stdout == ""
    (line,) = res.stderr.strip().splitlines()
    assert "no CUDA device" in line and torch.__version__ in line


def test_the_checks_cover_every_cuda_path():
    names = [n for n, _ in gpu_check.CHECKS]
    assert names == [
        "auto_batch",  # --batch-size 0 on CUDA (forward.AUTO_BATCH_TOKENS)
        "oom_halving",  # forward._Batched._smaller
        "pinned_shards",  # format/shardfile.py's pinned pool, filled by the forward pass
        "cpu_vs_gpu_diff",  # actcache extract --device cuda (tasks/extract.py pinned) + actcache diff
        "reader_device",  # read/dataset.py _on_device
        "gated_hooks",  # inputs/gates.py: a flag set on the bridge on the device
        "tokens_per_s",  # against the truncated HF pass
    ]
    assert all(f"  {n} " in gpu_check.__doc__ for n in names), "each check is described in the docstring"
    assert gpu_check.DIFF_ATOL > 0 and gpu_check.DIFF_RTOL > 0 and 0 < gpu_check.MIN_SPEED_RATIO <= 1


def test_a_failing_check_fails_the_run(capsys, tmp_path):
    ctx = gpu_check.Ctx("cpu", tmp_path, tmp_path, 8, rehearse=True)
    rows = gpu_check.run_checks(ctx, ["reader_device"])  # no set made before it: must fail, not pass quietly
    assert [(r["check"], r["ok"]) for r in rows] == [("reader_device", False)]
    assert "no set to read" in rows[0]["detail"]
    gpu_check.print_table(rows, "t")
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.subprocess
def test_rehearsal_runs_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "rows.json"
    res = run("bench/gpu_check.py", "--rehearse", "--out", str(out), timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    table = res.stdout.splitlines()
    assert table[0].startswith("gpu_check REHEARSAL")
    rows = {line.split()[0]: line.split()[1] for line in table[2:]}
    assert rows == {n: "ok" for n, _ in gpu_check.CHECKS}
    details = {r["check"]: r["detail"] for r in json.loads(out.read_text())["rows"]}
    assert details["oom_halving"] == details["pinned_shards"] == "skipped: CUDA only"
    assert "4 shards within" in details["cpu_vs_gpu_diff"] and "tok/s" in details["tokens_per_s"]
