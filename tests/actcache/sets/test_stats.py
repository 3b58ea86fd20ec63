"""``actcache stats``: computed once for a set written without statistics, identical to extraction's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from actcache.cli import app as cli
from actcache.format import layout, moments, records


def _as_if_old(url: str, tmp_path: Path) -> tuple[Path, bytes]:
    """A copy of the set as an actcache without statistics wrote it; return it and the original manifest."""
    root = tmp_path / Path(url).name
    shutil.copytree(url, root)
    original = (root / layout.MANIFEST).read_bytes()
    m = json.loads(original)
    del m["stats"], m["moments"], m[records.SEAL]  # seals came later than statistics
    (root / layout.MANIFEST).write_text(json.dumps(m, indent=1, sort_keys=True) + "\n")
    for rec in root.glob("done/*.json"):
        r = json.loads(rec.read_text())
        del r["extra"][moments.RECORD_FIELD], r[records.SEAL]
        rec.write_text(json.dumps(r, indent=1, sort_keys=True) + "\n")
    return root, original


def test_stats_of_an_old_set_are_written_once(extracted_set, tmp_path, capsys, monkeypatch):
    import tqdm.auto

    bars = []  # tqdm is off in tests (TQDM_DISABLE): record the bars made instead
    monkeypatch.setattr(tqdm.auto, "tqdm", lambda *a, **k: bars.append(k) or tqdm.std.tqdm(*a, **k))
    root, original = _as_if_old(extracted_set, tmp_path)
    assert cli.main(["stats", str(root)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("rows: 448  d: 32  NaN: 0  Inf: 0") and "scale (sqrt(d) / mean L2 norm)" in out
    assert len(bars) == 1, "shards were read: one progress bar"
    assert (root / layout.MANIFEST).read_bytes() == original, "the stats extraction wrote, nothing else changed"

    stamp = (root / layout.MANIFEST).stat().st_mtime_ns
    assert cli.main(["stats", str(root), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == json.loads(original)["stats"] and len(bars) == 1, "nothing read: no bar"
    assert (root / layout.MANIFEST).stat().st_mtime_ns == stamp, "present stats are only read"


def test_a_corrupted_shard_stops_before_the_manifest_is_touched(extracted_set, tmp_path, capsys):
    root, _ = _as_if_old(extracted_set, tmp_path)
    before = (root / layout.MANIFEST).read_bytes()
    shard = root / layout.shard_file(1, "none")
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert cli.main(["stats", str(root)]) == 1  # damaged data is a failure, not bad input
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shard 1 of" in err[0] and "fails its checksum" in err[0]
    assert (root / layout.MANIFEST).read_bytes() == before


@pytest.mark.parametrize("which", ["missing", "newer"])
def test_unknown_or_newer_sets_are_one_line(extracted_set, tmp_path, capsys, which):
    root = tmp_path / Path(extracted_set).name
    if which == "newer":
        shutil.copytree(extracted_set, root)
        m = json.loads((root / layout.MANIFEST).read_text())
        m["format_version"] = 99
        (root / layout.MANIFEST).write_text(json.dumps(m))
    assert cli.main(["stats", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("no activation set" in err[0] if which == "missing" else "upgrade actcache" in err[0])


def test_a_set_removed_while_its_stats_are_computed_gets_no_manifest_back(extracted_set, tmp_path, capsys, monkeypatch):
    """``actcache rm`` between the last read and the manifest's rewrite: stats wrote the manifest anyway, so the
    removed set came back as a complete set with no shards. The rewrite goes through ``commit``, which lists the
    shards first: one line, exit 1, nothing left behind but what rm had left."""
    root, _ = _as_if_old(extracted_set, tmp_path)
    merged = moments.merged

    def merged_then_removed(*a, **k):
        out = merged(*a, **k)
        for p in [*root.glob("shards/*"), *root.glob("done/*"), root / layout.MANIFEST]:
            p.unlink()
        return out

    monkeypatch.setattr(moments, "merged", merged_then_removed)
    assert cli.main(["stats", str(root)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "changed while it was written" in err[-1]
    assert not (root / layout.MANIFEST).exists()


def test_rm_refuses_a_set_whose_stats_are_being_computed(extracted_set, tmp_path, capsys, monkeypatch):
    """stats rewrites the manifest: it holds a writer lease while it reads the shards, as every writer does."""
    root, original = _as_if_old(extracted_set, tmp_path)
    merged, refused = moments.merged, []

    def merged_with_an_rm(*a, **k):
        refused.append(cli.main(["rm", str(root), "--yes"]))
        refused.append(capsys.readouterr().err)
        return merged(*a, **k)

    monkeypatch.setattr(moments, "merged", merged_with_an_rm)
    assert cli.main(["stats", str(root)]) == 0
    assert refused[0] == 1 and "is being written by process" in refused[1], refused
    assert (root / layout.MANIFEST).read_bytes() == original and not (root / layout.WRITERS).exists()


def test_a_manifest_rewritten_while_stats_are_computed_is_left_as_written(extracted_set, tmp_path, capsys, monkeypatch):
    """Another run extended the set while stats read its shards: the old manifest with stats added would drop the
    new shards. One line, exit 1, the other run's manifest kept."""
    root, _ = _as_if_old(extracted_set, tmp_path)
    merged = moments.merged
    theirs = json.loads((root / layout.MANIFEST).read_text())
    theirs["target_tokens"] += 64  # what an extension's manifest changes, among others
    theirs_bytes = (json.dumps(theirs, indent=1, sort_keys=True) + "\n").encode()

    def merged_then_rewritten(*a, **k):
        out = merged(*a, **k)
        (root / layout.MANIFEST).write_bytes(theirs_bytes)
        return out

    monkeypatch.setattr(moments, "merged", merged_then_rewritten)
    assert cli.main(["stats", str(root)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "changed while its statistics were computed" in err[-1] and "error" not in " ".join(err[:-1]), err
    assert (root / layout.MANIFEST).read_bytes() == theirs_bytes
