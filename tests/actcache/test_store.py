from __future__ import annotations

import os

import pytest

from actcache import layout, records
from actcache.errors import ActcacheError
from actcache.store import Store


def test_write_is_all_or_nothing(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    store.write_bytes("a/b.bin", b"first")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(ActcacheError, match="No space left on device"):
        store.write_bytes("a/b.bin", b"second, never visible")
    monkeypatch.undo()
    assert store.read_bytes("a/b.bin") == b"first"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.bin"], "no temp file left behind"


def test_listing_is_relative_and_temp_files_never_count(tmp_path):
    store = Store(str(tmp_path))
    store.write_bytes("s/shards/000000.safetensors", b"x" * 10)
    (tmp_path / "s" / "shards" / "000001.safetensors.tmp-1-abc").write_bytes(b"partial")
    listing = store.listing("s")
    assert listing["shards/000000.safetensors"].size == 10
    assert [layout.parse_shard_file(p) for p in sorted(listing)] == [0, None]


def test_scan_needs_record_file_and_size_and_rehashes_touched_shards(tmp_path):
    import hashlib
    import time

    store = Store(str(tmp_path))
    data = b"shard bytes"
    rel = layout.shard_file(0, "none")
    store.write_bytes(f"s/{rel}", data)
    assert not records.scan(store, "s", layout.MANIFEST).is_done(0, 1), "bytes without a record are not done"
    rec = records.Record(0, rel, 1, 8, hashlib.sha256(data).hexdigest(), len(data))
    records.write_record(store, "s", rec)
    scan = records.scan(store, "s", layout.MANIFEST)
    assert scan.is_done(0, 1) and not scan.is_done(0, 2)
    time.sleep(0.01)
    (tmp_path / "s" / rel).write_bytes(b"shard bytez")  # same size, touched after the record
    assert not records.scan(store, "s", layout.MANIFEST).is_done(0, 1)


def test_manifest_entries_cannot_escape_the_set(tmp_path):
    for bad in ("../other/shards/000000.safetensors", "/etc/passwd", "s3://x/y", "shards/../../x.safetensors"):
        with pytest.raises(ValueError):
            records.Record.from_dict({"index": 0, "file": bad, "n_seq": 1, "n_tokens": 1, "sha256": "", "bytes": 1})


def test_check_writable(tmp_path):
    from actcache.errors import ActcacheError

    Store(str(tmp_path / "new" / "deep")).check_writable()
    assert not (tmp_path / "new").exists(), "the check writes nothing"
    (tmp_path / "f").write_text("x")
    with pytest.raises(ActcacheError, match="is a file"):
        Store(str(tmp_path / "f")).check_writable()
    with pytest.raises(ActcacheError, match="inside the file"):
        Store(str(tmp_path / "f" / "sub")).check_writable()


def test_ranged_and_mapped_reads(tmp_path):
    store = Store(str(tmp_path))
    store.write_bytes("s/f.bin", bytes(range(100)))
    assert store.read_range("s/f.bin", 10, 13) == bytes([10, 11, 12])
    mapped = store.read_mapped("s/f.bin")
    assert bytes(mapped) == bytes(range(100))
    mapped[0] = 255  # copy-on-write: the file is not touched
    assert (tmp_path / "s" / "f.bin").read_bytes()[0] == 0
    store.write_bytes("s/empty.bin", b"")
    assert bytes(store.read_mapped("s/empty.bin")) == b""
    with pytest.raises(FileNotFoundError):
        store.read_mapped("s/missing.bin")
