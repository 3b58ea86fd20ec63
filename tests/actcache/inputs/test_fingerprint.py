import hashlib
import json

import pytest

from actcache.inputs import fingerprint


@pytest.fixture
def memo_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTCACHE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fingerprint, "MAX_ENTRIES", 3)
    return tmp_path / "cache"


def test_file_hash_is_the_content_hash_and_follows_edits(tmp_path, memo_dir):
    f = tmp_path / "a.txt"
    f.write_bytes(b"one")
    assert fingerprint.file_sha256(f) == hashlib.sha256(b"one").hexdigest()
    f.write_bytes(b"two!")  # another size: another stamp
    assert fingerprint.file_sha256(f) == hashlib.sha256(b"two!").hexdigest()


def test_file_hash_memo_drops_deleted_files_before_live_ones(tmp_path, memo_dir):
    files = [tmp_path / f"{i}.txt" for i in range(4)]
    for f in files:
        f.write_bytes(f.name.encode())
    fingerprint.file_sha256(files[0])
    fingerprint.file_sha256(files[1])
    files[1].unlink()
    fingerprint.file_sha256(files[2])
    fingerprint.file_sha256(files[3])  # a fourth entry: the deleted file's goes, the oldest live one stays
    memo = json.loads((memo_dir / "file-hashes.json").read_text())
    assert sorted(memo) == sorted(str(f.resolve()) for f in (files[0], files[2], files[3]))


def test_remembered_keeps_the_newest_entries(memo_dir):
    calls = []
    for i in range(5):
        assert fingerprint.remembered("t", f"k{i}", lambda i=i: calls.append(i) or i * 10) == i * 10
    memo = json.loads((memo_dir / "t.json").read_text())
    assert list(memo) == ["k2", "k3", "k4"]
    assert fingerprint.remembered("t", "k4", lambda: calls.append("again") or -1) == 40  # a hit: not recomputed
    assert fingerprint.remembered("t", "k0", lambda: calls.append("again") or 0) == 0  # pruned: computed again
    assert calls == [0, 1, 2, 3, 4, "again"]


@pytest.mark.parametrize("odd", ["link to /dev/zero", "FIFO"])
def test_a_device_or_fifo_among_a_models_files_is_refused_not_hashed_forever(tiny_models, tmp_path, odd):
    """A model folder whose extra.bin links to /dev/zero hung the run (its weights are hashed to fingerprint it);
    a FIFO would block. Both are one line naming the file."""
    import os
    import shutil

    from actcache.errors import ActcacheError
    from actcache.inputs.model import ModelSpec, resolve_model

    folder = shutil.copytree(tiny_models["gpt2"], tmp_path / "model")
    assert resolve_model(ModelSpec(str(folder))).fingerprint.startswith("local:")
    if odd == "FIFO":
        os.mkfifo(folder / "extra.bin")
    else:
        (folder / "extra.bin").symlink_to("/dev/zero")
    with pytest.raises(ActcacheError, match=r"extra\.bin' is not a regular file \(a device, FIFO or socket\)"):
        resolve_model(ModelSpec(str(folder)))
