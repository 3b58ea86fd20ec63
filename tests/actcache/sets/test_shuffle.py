"""``actcache shuffle``: every kept row once, in an order fixed by the seed alone, crash-safe, local or S3."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from setfiles import local_tree, normalized

from actcache import crashpoints
from actcache.cli import app as cli
from actcache.errors import ActcacheError
from actcache.format import layout, records
from actcache.format.manifest import read as read_manifest
from actcache.read.reader import open_set
from actcache.sets import shuffle
from actcache.storage.store import Store

CTX = 32


def rows_of(url: str) -> dict[str, torch.Tensor]:
    """A "rows" set's shards concatenated, read with safetensors alone."""
    m = json.loads((Path(url) / layout.MANIFEST).read_text())
    parts = [load_file(str(Path(url) / r["file"])) for r in m["shards"]]
    return {k: torch.cat([p[k] for p in parts]) for k in ("activations", "tokens", "positions")}


@pytest.fixture(scope="module")
def source(extracted_set):
    s = open_set(extracted_set)
    return {
        "url": extracted_set,
        "acts": torch.cat([sh.activations.reshape(-1, s.manifest["d"]) for sh in s]),
        "tokens": torch.cat([sh.tokens.reshape(-1) for sh in s]),
        "manifest": s.manifest,
    }


def test_every_kept_row_once_in_the_rows_layout(source, tmp_path):
    special = source["manifest"]["tokenization"]["bos_id"]
    r = shuffle.shuffle_set(source["url"], out=str(tmp_path), seed=1, rows_per_shard=100, exclude_special=True)
    kept = int((source["tokens"] != special).sum())
    assert (r.rows, r.shards, r.excluded_rows, r.skipped) == (kept, 5, 448 - kept, False)
    got = rows_of(r.url)
    pos = got["positions"]
    assert got["activations"].dtype == torch.float16 and got["activations"].shape == (kept, 32)
    assert got["tokens"].dtype == torch.int32 and pos.dtype == torch.int64
    assert sorted(pos.tolist()) == [i for i in range(448) if source["tokens"][i] != special]
    assert torch.equal(got["activations"], source["acts"][pos]) and torch.equal(got["tokens"], source["tokens"][pos])

    m = read_manifest(Store(str(tmp_path)), Path(r.url).name)  # the manifest reader accepts a "rows" set
    assert m["layout"] == "rows" and m["source"]["set_id"] == Path(source["url"]).name
    assert m["source"]["model"] == source["manifest"]["model"] and m["hook"] == source["manifest"]["hook"]
    assert m["excluded"] == {"ids": [special], "rows": 448 - kept} and m["complete"] and m["n_tokens"] == kept
    assert [s["n_seq"] for s in m["shards"]] == [100, 100, 100, 100, kept - 400]
    st = m["stats"]
    assert st["n"] == kept
    np.testing.assert_allclose(st["mean"], got["activations"].double().mean(0).numpy(), rtol=1e-6, atol=1e-9)
    assert not (Path(r.url) / layout.SPILL).exists(), "spill files are removed once the set is complete"


def test_reading_in_order_gives_iid_rows_the_source_order_does_not(source, tmp_path):
    """Rows of one source sequence: together in the source's order, spread over every shard once shuffled."""
    r = shuffle.shuffle_set(source["url"], out=str(tmp_path), seed=2, rows_per_shard=64)
    pos = rows_of(r.url)["positions"].numpy()
    n_shards = r.shards

    def shards_per_sequence(order: np.ndarray) -> float:
        shard_of = np.empty(len(order), dtype=np.int64)
        shard_of[order] = np.arange(len(order)) // 64
        return float(np.mean([len(set(shard_of[s * CTX : (s + 1) * CTX])) for s in range(len(order) // CTX)]))

    expected = n_shards * (1 - (1 - 1 / n_shards) ** CTX)  # 32 rows dealt at random over 7 shards
    assert shards_per_sequence(np.arange(448)) <= 2
    assert shards_per_sequence(pos) > 0.9 * expected
    # Neighbours in the output are unrelated in the source: their position gaps look like random pairs'.
    rank_corr = np.corrcoef(np.arange(len(pos)), pos)[0, 1]
    assert abs(rank_corr) < 0.15
    assert np.median(np.abs(np.diff(pos))) > 448 / 5


def test_the_seed_alone_fixes_the_bytes(source, tmp_path):
    """Bucket count, slicing and read concurrency change how the work is cut, never the result."""
    a = shuffle.shuffle_set(source["url"], out=str(tmp_path / "a"), seed=5, rows_per_shard=50)
    b = shuffle.shuffle_set(source["url"], out=str(tmp_path / "b"), seed=5, rows_per_shard=50, bucket_rows=7, jobs=1)
    c = shuffle.shuffle_set(source["url"], out=str(tmp_path / "c"), seed=6, rows_per_shard=50)
    assert Path(a.url).name == Path(b.url).name != Path(c.url).name
    assert local_tree(tmp_path / "a") == local_tree(tmp_path / "b")
    assert not torch.equal(rows_of(a.url)["positions"], rows_of(c.url)["positions"])


def test_slices_stay_within_bucket_rows(source, tmp_path, monkeypatch):
    seen = []
    add = shuffle._Writer.add
    monkeypatch.setattr(shuffle._Writer, "add", lambda self, a, t, p: (seen.append(len(t)), add(self, a, t, p)))
    r = shuffle.shuffle_set(source["url"], out=str(tmp_path), seed=5, rows_per_shard=50, bucket_rows=7)
    assert max(seen) <= 7 and sum(seen) == r.rows == 448


def test_a_rerun_of_a_finished_shuffle_writes_nothing(source, tmp_path, capsys):
    args = ["shuffle", source["url"], "--out", str(tmp_path), "--seed", "3", "--shard-rows", "100"]
    assert cli.main(args) == 0
    out = capsys.readouterr()
    url = out.out.strip().splitlines()[-1]
    assert "written: 448 rows in 5 shards, 0 rows excluded" in out.err
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert cli.main(args) == 0
    out = capsys.readouterr()
    assert out.out.strip().splitlines()[-1] == url and "already complete" in out.err
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == stamps
    assert cli.main(["verify", url]) == 0 and "OK: 5 shards, 448 tokens" in capsys.readouterr().out
    assert cli.main(["ls", str(tmp_path)]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[0] == Path(url).name and row[-1] == "complete"
    assert row[2:5] == ["blocks.1.hook_resid_post", "shuffled", "448"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--exclude-ids", "5,-1"], "token id -1 is outside the vocabulary"),
        (["--exclude-ids", "5,x"], "--exclude-ids takes comma-separated token ids"),
        (["--seed", "-1"], "--seed must be between 0 and 2^64 - 1"),
        (["--bucket-rows", "0"], "--bucket-rows must be at least 1"),
        (["--shard-rows=-1"], "--shard-rows must be at least 1"),  # the field is rows_per_shard: cli.FLAG_NAMES
    ],
)
def test_bad_input_is_one_line(source, tmp_path, capsys, args, message):
    assert cli.main(["shuffle", source["url"], "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not list(tmp_path.iterdir()), "nothing written"


def test_an_out_that_is_a_file_is_named_as_the_option_given(source, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert cli.main(["shuffle", source["url"], "--out", str(tmp_path / "f")]) == 2
    [err] = capsys.readouterr().err.strip().splitlines()
    assert "is a file; pass a directory (or a new path) as --out" in err
    with pytest.raises(ActcacheError, match="as out$"):
        shuffle.shuffle_set(source["url"], out=str(tmp_path / "f"))


def test_library_errors_name_the_parameter_not_the_flag(source, tmp_path):
    for kwargs, field in (
        ({"rows_per_shard": -1}, "rows_per_shard"),
        ({"seed": -1}, "seed"),
        ({"exclude_ids": [-1]}, "exclude_ids"),
    ):
        with pytest.raises(ActcacheError) as e:
            shuffle.shuffle_set(source["url"], out=str(tmp_path), **kwargs)
        assert field in str(e.value) and "--" not in str(e.value) and e.value.fields == [field]
    assert not list(tmp_path.iterdir())


def test_ids_beyond_a_recorded_vocabulary_are_refused(source, tmp_path, capsys):
    import shutil

    src = tmp_path / "src" / Path(source["url"]).name
    shutil.copytree(source["url"], src)
    m = json.loads((src / layout.MANIFEST).read_text())
    m["tokenization"].update(vocab_size=512, eos_id=0, pad_id=None)  # what newer extractions record
    (src / layout.MANIFEST).write_text(json.dumps(records.sealed(m)))  # as actcache writes it (sealed)
    assert cli.main(["shuffle", str(src), "--out", str(tmp_path / "out"), "--exclude-ids", "511,512"]) == 2
    assert "token id 512 is outside the vocabulary of this set's tokenizer (0..511)" in capsys.readouterr().err
    with pytest.raises(ActcacheError, match="already a shuffled set"):
        r = shuffle.shuffle_set(str(src), out=str(tmp_path / "out"), exclude_ids=[511])
        shuffle.shuffle_set(r.url, out=str(tmp_path / "again"))
    assert cli.main(["shuffle", str(tmp_path / "nowhere" / Path(source["url"]).name)]) == 2
    assert "no activation set at" in capsys.readouterr().err


def test_shuffled_on_s3_equals_shuffled_locally(source, tmp_path, s3_server, s3_env):
    local = shuffle.shuffle_set(source["url"], out=str(tmp_path), seed=4, rows_per_shard=100, bucket_rows=30)
    prefix = s3_server.new_prefix()
    remote = shuffle.shuffle_set(source["url"], out=prefix, seed=4, rows_per_shard=100, bucket_rows=30)
    sid = Path(local.url).name
    assert remote.url == f"{prefix}/{sid}"
    on_s3 = {k: v for k, v in s3_server.keys_under(prefix).items()}
    assert normalized(on_s3) == local_tree(tmp_path), "same files, same bytes; no spill left behind"
    assert shuffle.shuffle_set(source["url"], out=prefix, seed=4, rows_per_shard=100).skipped


# -- kill -9 anywhere, then rerun: the same bytes --------------------------------------------------------
_REACHED = {
    "shuffle.spill-written": 4,
    "shuffle.spill-recorded": 4,
    "shuffle.shard-written": 5,
    "shuffle.shard-recorded": 5,
    "shuffle.manifest-written": 1,
    "store.temp-written": 19,
}


def _cases(seed: int = 20261130) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [(p, rng.randint(1, _REACHED[p])) for p in (*crashpoints.SHUFFLE_POINTS, "store.temp-written")]


def _run(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ACTCACHE_FAULT"}
    if fault:
        env["ACTCACHE_FAULT"] = fault
    proc = subprocess.Popen(
        [sys.executable, "-m", "actcache.cli.app", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def crash_args(source):
    return [
        "shuffle",
        source["url"],
        "--seed",
        "9",
        "--shard-rows",
        "100",
        "--bucket-rows",
        "40",
        "--exclude-special-tokens",
    ]


@pytest.fixture(scope="module")
def reference(crash_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("shuffle-reference")
    proc = _run([*crash_args, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return local_tree(out)


def test_the_cases_cover_every_shuffle_point():
    assert {p for p, _ in _cases()} == {*crashpoints.SHUFFLE_POINTS, "store.temp-written"}


@pytest.mark.subprocess
@pytest.mark.parametrize("point,nth", _cases(), ids=[f"{p}:{n}" for p, n in _cases()])
def test_kill_then_rerun_gives_the_same_set(crash_args, reference, tmp_path, point, nth):
    killed = _run([*crash_args, "--out", str(tmp_path)], f"{point}:{nth}")
    assert killed.returncode == -signal.SIGKILL, f"never reached {point}:{nth}\n{killed.stderr[-2000:]}"
    rerun = _run([*crash_args, "--out", str(tmp_path)])
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert local_tree(tmp_path) == reference, "no temp file, no spill file, every byte the same"


@pytest.mark.subprocess
def test_an_unfinished_shuffle_is_named_so_and_its_advice_finishes_it(crash_args, reference, tmp_path, capsys):
    """``verify``/``show`` of a shuffle killed before its manifest said to rerun ``actcache extract``, which cannot
    finish a shuffled set: the advice names the shuffle, and following it gives the reference bytes."""
    from actcache.cli import app as cli

    killed = _run([*crash_args, "--out", str(tmp_path)], "shuffle.shard-written:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (unfinished,) = [p for p in tmp_path.iterdir() if layout.SET_ID_RE.match(p.name)]
    for command in ("verify", "show"):
        assert cli.main([command, str(unfinished)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert "rerun the same `actcache shuffle` to finish it" in err[-1] and "extract" not in err[-1]
    rerun = _run([*crash_args, "--out", str(tmp_path)])
    assert rerun.returncode == 0 and local_tree(tmp_path) == reference, rerun.stderr[-2000:]


@pytest.mark.subprocess
def test_a_damaged_spill_is_spilled_again(crash_args, reference, tmp_path):
    """A rerun after a crash reuses a spill only if its record's seal and its file's sha256 hold: an edited record
    (plausible: same row total) and a spill file rotted in place (same size, mtime set back) are spilled again,
    and the set has the bytes of an uninterrupted run."""
    killed = _run([*crash_args, "--out", str(tmp_path)], "shuffle.shard-written:1")  # every spill recorded
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    spill = next(tmp_path.glob(f"*/{layout.SPILL}"))
    edited = spill / Path(layout.spill_record(0)).name
    r = json.loads(edited.read_text())
    b = next(i for i, c in enumerate(r["counts"][:-1]) if c)
    r["counts"][b] -= 1  # one row moved to the next bucket: the old checks (size, row total) still pass
    r["counts"][b + 1] += 1
    edited.write_text(json.dumps(r))
    rotted = spill / Path(layout.spill_file(1)).name
    rows_at = json.loads((spill / Path(layout.spill_record(1)).name).read_text())["rows_at"]
    before = rotted.stat()
    data = bytearray(rotted.read_bytes())
    data[rows_at + 1] ^= 0xFF  # a byte of the first row's activations
    rotted.write_bytes(bytes(data))
    os.utime(rotted, ns=(before.st_atime_ns, before.st_mtime_ns))
    rerun = _run([*crash_args, "--out", str(tmp_path)])
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert local_tree(tmp_path) == reference


def test_an_out_store_inside_the_source_set_is_refused(source, tmp_path, capsys):
    """``--out`` the source set's own folder (or a folder in it) would nest a set inside it: one line, exit 2,
    nothing written."""
    import shutil
    from pathlib import Path

    from actcache.cli import app as cli

    set_dir = shutil.copytree(Path(source["url"]), tmp_path / "store" / Path(source["url"]).name)
    before = sorted(p for p in set_dir.rglob("*"))
    for out in (set_dir, set_dir / "sub"):
        assert cli.main(["shuffle", str(set_dir), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is inside the set" in err[0]
    assert sorted(p for p in set_dir.rglob("*")) == before


def test_an_out_store_inside_a_stores_own_layout_is_refused(source, tmp_path, capsys):
    """``--out`` another set's folder, or a store's ``_tokens``, would nest a set among files whose names actcache
    owns: one line, exit 2, nothing written."""
    import shutil
    from pathlib import Path

    from actcache.cli import app as cli

    set_dir = shutil.copytree(Path(source["url"]), tmp_path / "store" / Path(source["url"]).name)
    other = shutil.copytree(set_dir, tmp_path / "other" / set_dir.name)
    before = sorted(tmp_path.rglob("*"))
    for out in (other / "nested", tmp_path / "store" / "_tokens"):
        assert cli.main(["shuffle", str(set_dir), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "a folder of a store's own layout" in err[0]
    assert sorted(tmp_path.rglob("*")) == before
