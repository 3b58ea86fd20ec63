from __future__ import annotations

import json
import os
import re

import pytest

from actcache.errors import ActcacheError, Failure
from actcache.format import layout, records
from actcache.storage.store import Store


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

    store = Store(str(tmp_path))
    data = b"shard bytes"
    rel = layout.shard_file(0, "none")
    store.write_bytes(f"s/{rel}", data)
    assert not records.scan(store, "s", layout.MANIFEST).is_done(0, 1), "bytes without a record are not done"
    rec = records.Record(0, rel, 1, 8, hashlib.sha256(data).hexdigest(), len(data))
    records.write_record(store, "s", rec)
    scan = records.scan(store, "s", layout.MANIFEST)
    assert scan.is_done(0, 1) and not scan.is_done(0, 2)
    (tmp_path / "s" / rel).write_bytes(b"shard bytez")  # same size, touched after the record:
    written = (tmp_path / "s" / layout.record_file(0)).stat().st_mtime_ns
    os.utime(tmp_path / "s" / rel, ns=(written + 10**9, written + 10**9))  # explicitly later, whatever the clock
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
    from actcache.storage.store import DamagedFile

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
    assert bytes(store.read_mapped("s/f.bin", size=100)) == bytes(range(100))
    with pytest.raises(DamagedFile, match="has 100 bytes, expected 99"):
        store.read_mapped("s/f.bin", size=99)


def test_store_ref_is_one_picklable_value_that_opens_the_store(tmp_path):
    import pickle

    from actcache.storage.store import StoreRef

    ref = StoreRef(str(tmp_path), {"auto_mkdir": True}, None)
    assert pickle.loads(pickle.dumps(ref)) == ref and hash(ref) == hash(StoreRef(str(tmp_path)))
    set_ref = ref.child("0123456789abcdef01234567")
    assert set_ref.storage_options == {"auto_mkdir": True}  # options travel with the set's URL
    assert set_ref.split() == (ref, "0123456789abcdef01234567")
    assert StoreRef("abc").split() == (StoreRef("."), "abc") and StoreRef("/abc").split() == (StoreRef("/"), "abc")
    store = ref.open()
    store.write_bytes("x/y", b"1")
    assert store.ref == ref and Store(str(tmp_path)).read_bytes("x/y") == b"1"
    assert StoreRef.of(str(tmp_path), {"auto_mkdir": True}) == ref and StoreRef.of(ref) is ref
    with pytest.raises(TypeError, match="inside the StoreRef"):
        StoreRef.of(ref, {"anon": True})


def test_store_ref_repr_names_options_but_never_shows_their_values():
    from actcache.storage.store import StoreRef

    ref = StoreRef("s3://b/p", {"profile": "Pr0file-Value-91", "endpoint_url": "http://h:1"}, "blk")
    for text in (repr(ref), repr(ref.child("x")), str(ref.split()), repr([ref])):
        assert "Pr0file-Value-91" not in text and "http://h:1" not in text
    assert repr(ref) == "StoreRef('s3://b/p', storage_options=<endpoint_url, profile>, credentials_block='blk')"
    with pytest.raises(ActcacheError, match=r"must not hold credentials \(secret\)") as e:
        StoreRef("s3://b/p", {"secret": "S3cr3t-Value-91"})  # refused where it enters (actcache/storage/secrets.py)
    assert "S3cr3t-Value-91" not in str(e.value)
    assert repr(StoreRef(".")) == "StoreRef('.', storage_options=<none>, credentials_block=None)"


# -- issue 12: readers open only regular files inside the store, and read at most what they expect -----------
def _read_in_thread(fn):
    """Run ``fn`` in a thread and give back its outcome; a read that blocks (a FIFO) fails instead of hanging."""
    import threading

    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # handed back to the test
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "the read blocked"
    return out


@pytest.mark.parametrize(
    "kind",
    [
        "symlink to /dev/zero",
        "symlink to /dev/urandom",
        "symlink inside the store",
        "symlink outside the store",
        "FIFO",
        "socket",
        "symlinked folder",
        "dangling symlink",
        "folder",
        "file where its folder should be",
    ],
)
def test_reads_refuse_anything_but_a_regular_file_inside_the_store(tmp_path, kind):
    import socket

    from actcache.storage.store import DamagedFile

    root = tmp_path / "store"
    (root / "s" / "shards").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "000000.safetensors").write_bytes(b"secret outside the store")
    (root / "s" / "real.bin").write_bytes(b"inside")
    target = root / "s" / "shards" / "000000.safetensors"
    if kind == "symlink to /dev/zero":
        target.symlink_to("/dev/zero")
    elif kind == "symlink to /dev/urandom":
        target.symlink_to("/dev/urandom")
    elif kind == "symlink inside the store":
        target.symlink_to(root / "s" / "real.bin")
    elif kind == "symlink outside the store":
        target.symlink_to(outside / "000000.safetensors")
    elif kind == "FIFO":
        os.mkfifo(target)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(target))
    elif kind == "symlinked folder":
        (root / "s" / "shards").rmdir()
        (root / "s" / "shards").symlink_to(outside)
    elif kind == "folder":  # opens read-only, and a bare IsADirectoryError used to escape
        (target / "x").mkdir(parents=True)
    elif kind == "file where its folder should be":
        (root / "s" / "shards").rmdir()
        (root / "s" / "shards").write_bytes(b"")
    else:
        target.symlink_to(tmp_path / "nowhere")
    store = Store(str(root))
    rel = "s/shards/000000.safetensors"
    for read in (
        lambda: store.read_bytes(rel),
        lambda: store.read_bytes(rel, size=10),
        lambda: store.read_json(rel),
        lambda: store.read_mapped(rel),
        lambda: store.read_mapped(rel, size=10),
        lambda: store.read_range(rel, 0, 4),
    ):
        out = _read_in_thread(read)
        assert isinstance(out.get("error"), DamagedFile), (kind, out)
        assert "\n" not in str(out["error"]) and str(root) in str(out["error"])
    assert rel not in store.listing("") and "shards/000000.safetensors" not in store.listing("s")
    if kind in ("folder", "file where its folder should be"):
        # Not actcache's to delete: the write says what stands in its way, in one line (no "free space").
        with pytest.raises(Failure, match="a folder stands where the file should be, or a file where") as e:
            store.write_bytes(rel, b"rewritten")
        assert "\n" not in str(e.value) and "free space" not in str(e.value)
        return
    # A write replaces the link, FIFO or linked folder itself by a real file or folder, never what it points to.
    store.write_bytes(rel, b"rewritten")
    assert store.read_bytes(rel) == b"rewritten" and not target.is_symlink()
    assert not (root / "s" / "shards").is_symlink()
    assert (outside / "000000.safetensors").read_bytes() == b"secret outside the store"


def test_the_store_root_itself_may_be_a_symlink(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    store = Store(str(tmp_path / "link"))
    store.write_bytes("s/a.bin", b"ok")
    assert store.read_bytes("s/a.bin", size=2) == b"ok"


def test_reads_stop_at_the_expected_size(tmp_path):
    from actcache.storage.store import DamagedFile

    store = Store(str(tmp_path))
    store.write_bytes("a.bin", b"x" * 100)
    assert store.read_bytes("a.bin", size=100) == b"x" * 100
    with pytest.raises(DamagedFile, match="larger than 99 bytes"):
        store.read_bytes("a.bin", size=99)
    with pytest.raises(DamagedFile, match="has 100 bytes, expected 101"):
        store.read_bytes("a.bin", size=101)
    with pytest.raises(DamagedFile, match="larger than 10 bytes"):
        store.read_bytes("a.bin", limit=10)
    with pytest.raises(FileNotFoundError):
        store.read_bytes("missing.bin")


@pytest.mark.parametrize(
    "text,message",
    [
        ("[" * 200_000 + "]" * 200_000, "nested too deeply|far more than actcache writes"),  # refused before parsing
        ("[" * 3_000 + "]" * 3_000, "nested too deeply"),
        (json.dumps({"a": json.loads("[" * 40 + "]" * 40)}), "nested more than 32 levels"),
        ('{"a": ', "not valid JSON"),
        ("\udcff", "not valid JSON"),
    ],
)
def test_store_json_is_bounded_and_fails_in_one_line(tmp_path, text, message):
    from actcache.storage.store import DamagedFile

    (tmp_path / "f.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(DamagedFile, match=message) as e:
        Store(str(tmp_path)).read_json("f.json")
    assert "\n" not in str(e.value)
    if len(text) > 10:
        with pytest.raises(DamagedFile, match="larger than 10 bytes"):
            Store(str(tmp_path)).read_json("f.json", limit=10)


def test_store_writes_strict_json_only(tmp_path):
    store = Store(str(tmp_path))
    for bad in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(ValueError):
            store.write_json("x.json", {"mean_l2_norm": bad})
    assert not (tmp_path / "x.json").exists()


def test_json_denser_in_objects_than_actcache_writes_is_refused_before_parsing(tmp_path):
    """47 MB of ``[{},{},...]`` in a manifest made json.loads allocate 2.2 GB (48 bytes per byte): a file with more
    than one object or list per JSON_DENSITY bytes is refused before it is parsed; actcache's own files (one per
    100-350 bytes) and small ones of any shape parse."""
    import resource

    from actcache.storage import store as store_mod
    from actcache.storage.store import DamagedFile, parse_json

    assert parse_json(b'{"a": [{}, {}, [[]]]}', "small") == {"a": [{}, {}, [[]]]}
    entry = {"index": 0, "file": "shards/000000.safetensors", "n_seq": 4, "sha256": "0" * 64, "extra": {"env": {}}}
    legit = json.dumps({"shards": [entry] * 200_000}).encode()
    assert len(parse_json(legit, "manifest")["shards"]) == 200_000
    forged = b'{"shards": [' + b"{}," * (16 << 20) + b"{}]}"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DamagedFile, match=r"holds \d+ objects and lists in \d+ bytes, far more than actcache writes"):
        parse_json(forged, "manifest")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 64 << 10  # KB
    assert store_mod.JSON_DENSITY <= 16


@pytest.mark.parametrize(
    "kind,says",
    [
        ("missing", "does not exist (no such directory)"),
        ("fifo", "is a FIFO, not a directory"),
        ("file", "is a file, not a directory"),
        ("loop", "is a loop of symlinks, not a directory"),
        ("dangling", "is a symlink to"),
    ],
)
def test_a_store_that_is_not_a_folder_says_what_it_is(tmp_path, kind, says, capsys):
    """`ls` of a FIFO or a symlink loop said "does not exist"; each odd file is named for what it is, exit 2,
    and nothing waits on a FIFO."""
    from actcache.cli import app as cli

    p = tmp_path / "store"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "file":
        p.write_text("")
    elif kind == "loop":
        p.symlink_to(tmp_path / "other")
        (tmp_path / "other").symlink_to(p)
    elif kind == "dangling":
        p.symlink_to(tmp_path / "gone")
    with pytest.raises(ActcacheError, match=re.escape(says)):
        Store(str(p)).check_reachable()
    assert cli.main(["ls", str(p)]) == 2
    assert says in capsys.readouterr().err.strip().splitlines()[-1]
