"""The one write order of a set: each shard's bytes, then its record, then the manifest, with the crash points."""

from __future__ import annotations

import json

import pytest

from actcache import crashpoints
from actcache.errors import Failure
from actcache.format import layout, manifest, records
from actcache.format.commit import REBUILDS, Points, SetChanged, Shard, commit, rebuilding
from actcache.storage.store import Store


class Recording(Store):
    """A local store that logs every write."""

    def __init__(self, url: str, log: list[str]):
        super().__init__(url)
        self.log = log

    def write_bytes(self, rel, data):
        self.log.append(f"write {rel}")
        super().write_bytes(rel, data)


def test_bytes_then_record_then_manifest_with_the_named_points(tmp_path, monkeypatch):
    log: list[str] = []
    # The store's own point (a local write's temp file) is not commit's business.
    monkeypatch.setattr(crashpoints, "point", lambda name: name == "store.temp-written" or log.append(f"point {name}"))
    store = Recording(str(tmp_path), log)
    shards = [Shard(records.Record(i, layout.shard_file(i, "none"), 1, 4, f"{i:064x}", 3), b"abc") for i in range(2)]
    points = Points("w", "r", "m0", "m1")
    commit(store, "s", shards, {"set_id": "s"}, points=points)
    assert log == [
        f"write s/{layout.shard_file(0, 'none')}",
        "point w",
        f"write s/{layout.record_file(0)}",
        "point r",
        f"write s/{layout.shard_file(1, 'none')}",
        "point w",
        f"write s/{layout.record_file(1)}",
        "point r",
        "point m0",
        f"write s/{layout.MANIFEST}",
        "point m1",
    ]
    written = json.loads((tmp_path / "s" / layout.record_file(1)).read_text())
    assert records.check_sealed(written, "record") and written["index"] == 1
    assert records.SEAL in json.loads((tmp_path / "s" / layout.MANIFEST).read_text())  # a dict is sealed

    # A record as another store holds it, and a manifest as bytes, are written verbatim; no points, none reached.
    log.clear()
    stored = b'{"stored": true}'
    commit(store, "t", [Shard(shards[0].record, b"xyz", stored)], b'{"m": 1}')
    assert [e for e in log if e.startswith("point")] == []
    assert (tmp_path / "t" / layout.record_file(0)).read_bytes() == stored
    assert (tmp_path / "t" / layout.MANIFEST).read_bytes() == b'{"m": 1}'


def _one_shard(store: Store, set_id: str, data: bytes) -> dict:
    rec = records.Record(0, layout.shard_file(0, "none"), 1, 4, "0" * 64, len(data))
    commit(store, set_id, [Shard(rec, data)])
    return {"set_id": set_id, "shards": [rec.to_dict()]}


def test_a_shard_replaced_by_another_writer_is_told_apart_from_one_removed(tmp_path):
    """Runs of one set with different targets write at once: a higher target completes the lower one's partial last
    shard. The lower one's manifest, built before, is stale (``SetChanged``: built again), not a set removed."""
    store = Store(str(tmp_path))
    doc = _one_shard(store, "s", b"abc")
    (tmp_path / "s" / layout.shard_file(0, "none")).write_bytes(b"abcdef")  # the full shard, another writer's
    with pytest.raises(SetChanged, match="another writer of the set replaced shard 0"):
        commit(store, "s", manifest_doc=doc)
    assert not (tmp_path / "s" / layout.MANIFEST).exists()
    (tmp_path / "s" / layout.shard_file(0, "none")).unlink()
    with pytest.raises(Failure, match="shard 0 .* is no longer there") as e:
        commit(store, "s", manifest_doc=doc)
    assert not isinstance(e.value, SetChanged) and not (tmp_path / "s" / layout.MANIFEST).exists()


def test_a_manifest_overtaken_after_its_write_is_removed_and_built_again(tmp_path, monkeypatch):
    """The shard replaced between the manifest's write and its check: the stale manifest goes, and ``rebuilding``
    writes one from a new scan that names the shard as it now is."""
    store = Store(str(tmp_path))
    doc = _one_shard(store, "s", b"abc")
    real = manifest.write
    scans: list[dict] = []

    def write_then_overtaken(store_, set_id, m):
        real(store_, set_id, m)
        if len(scans) == 1:  # the first attempt: another writer completes the shard just after
            _one_shard(store, "s", b"abcdef")

    monkeypatch.setattr(manifest, "write", write_then_overtaken)

    def build_and_commit():
        shards = [json.loads((tmp_path / "s" / layout.record_file(0)).read_text())]
        scans.append(shards[0])
        commit(store, "s", manifest_doc={**doc, "shards": [{k: r[k] for k in doc["shards"][0]} for r in shards]})

    rebuilding(build_and_commit)
    assert [s["bytes"] for s in scans] == [3, 6]
    written = json.loads((tmp_path / "s" / layout.MANIFEST).read_text())
    assert written["shards"][0]["bytes"] == 6


def test_rebuilding_gives_up_after_its_attempts(monkeypatch):
    monkeypatch.setattr("actcache.format.commit.time.sleep", lambda s: None)
    calls = []

    def always_overtaken():
        calls.append(1)
        raise SetChanged("overtaken")

    with pytest.raises(SetChanged):
        rebuilding(always_overtaken)
    assert len(calls) == REBUILDS
