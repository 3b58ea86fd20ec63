"""The one write order of a set: each shard's bytes, then its record, then the manifest, with the crash points."""

from __future__ import annotations

import json

from actcache import crashpoints
from actcache.format import layout, records
from actcache.format.commit import Points, Shard, commit
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
