"""Disk full and concurrent writers on a local store: a clear error, nothing half-done, reruns complete."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from cliargs import PROCESS, config_argv
from setfiles import local_tree

import actcache
from actcache.cli.app import main
from actcache.format import layout, records
from actcache.read.reader import open_set

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _assert_nothing_half_done(store: Path) -> None:
    """Every completion record points at a whole shard with its checksum; no temp file remains."""
    import hashlib

    for rec_path in store.rglob("done/*.json"):
        rec = json.loads(rec_path.read_text())
        shard = rec_path.parent.parent / rec["file"]
        assert hashlib.sha256(shard.read_bytes()).hexdigest() == rec["sha256"]
    assert not [p for p in store.rglob("*") if ".tmp-" in p.name]


@pytest.fixture
def reference(base_config, tmp_path):
    url = actcache.extract(base_config.replace(store=str(tmp_path / "reference")))
    return local_tree(Path(url).parent)


def test_injected_enospc_is_one_line_and_a_rerun_completes(base_config, reference, monkeypatch, capsys):
    real_fsync, calls = os.fsync, {"n": 0}

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] > 14:  # part way through the shards
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    argv = config_argv(base_config, device=None)
    assert main(argv) != 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("actcache: error: cannot write ") and "No space left on device" in last
    store = Path(base_config.store)
    _assert_nothing_half_done(store)
    assert len(list(store.rglob("shards/*.safetensors"))) < 8, "the failure hit before the end"

    monkeypatch.setattr(os, "fsync", real_fsync)
    assert main(argv) == 0
    assert local_tree(store) == reference


@pytest.fixture
def small_disk(tmp_path):
    """A real 96 KiB tmpfs: room for part of a set, not all of it."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)], capture_output=True).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (needs root); the injected ENOSPC test covers the logic")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.subprocess
def test_real_disk_full_then_space_freed(base_config, reference, small_disk, capsys):
    cfg = base_config.replace(store=str(small_disk / "store"))
    with pytest.raises(actcache.ActcacheError, match="No space left on device"):
        actcache.extract(cfg)
    _assert_nothing_half_done(small_disk / "store")
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    actcache.extract(cfg)
    assert local_tree(small_disk / "store") == reference


@pytest.mark.subprocess
@pytest.mark.slow  # several CLI processes: `make test` runs it, `make test-fast` does not
def test_two_processes_extract_the_same_set_at_once(base_config, reference, tmp_path):
    store = tmp_path / "shared"
    argv = [*PROCESS, *config_argv(base_config, store, device=None)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    procs = [
        subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
        )
        for _ in range(2)
    ]
    try:
        for p in procs:
            p.wait(timeout=400)
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # Prefect's temporary server, if left behind
            except ProcessLookupError:
                pass
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outs]
    urls = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(urls) == 1
    assert open_set(urls.pop()).verify() == []
    assert local_tree(store) == reference


@pytest.mark.subprocess
@pytest.mark.slow  # several CLI processes: `make test` runs it, `make test-fast` does not
@pytest.mark.parametrize("targets", [(448, 512), (416, 480, 512)])
def test_processes_with_different_max_tokens_at_once(base_config, reference, tmp_path, targets):
    """Runs of one set asking different --max-tokens, started together: every one succeeds, and the set ends as
    the largest target's, byte for byte (a lower target's partial last shard never stays over a full one)."""
    from prefect.settings import PREFECT_API_URL

    store = tmp_path / "shared"
    env = {**os.environ, "TQDM_DISABLE": "1", "PREFECT_API_URL": PREFECT_API_URL.value()}
    procs = []
    for max_tokens in targets:
        argv = [
            *PROCESS,
            *config_argv(base_config, store, max_tokens=max_tokens),
        ]
        procs.append(
            subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
            )
        )
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0] * len(targets), [o[1][-1500:] for o in outs]
    url = {o[0].strip().splitlines()[-1] for o in outs}.pop()
    assert open_set(url).verify() == [] and open_set(url).n_tokens == 512
    files, want = local_tree(store), dict(reference)
    for tree in (files, want):  # the manifest's target is its last writer's
        for rel in [r for r in tree if r.endswith(layout.MANIFEST)]:
            m = json.loads(tree[rel])
            m.pop("target_tokens")
            tree[rel] = json.dumps(m, sort_keys=True).encode()
    assert files == want


def test_hand_edited_manifest_is_refused(base_config, tmp_path):
    url = actcache.extract(base_config)
    path = Path(url) / layout.MANIFEST
    m = json.loads(path.read_text())
    m["hook"] = m["key"]["hook"] = "blocks.0.hook_resid_post"  # relabelled: the key no longer hashes to its id
    path.write_text(json.dumps(records.sealed(m)))  # even with a valid seal
    with pytest.raises(actcache.ActcacheError, match="edited by hand"):
        open_set(url)
    m["format_version"] = 99
    path.write_text(json.dumps(m))
    with pytest.raises(actcache.ActcacheError, match="newer than this actcache reads"):
        open_set(url)
