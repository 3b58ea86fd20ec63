"""``actcache rm`` and ``actcache gc`` on a local store and a real S3 endpoint: what they remove, what they refuse,
and what a kill in the middle of ``rm`` leaves behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from setfiles import local_tree

from actcache import crashpoints
from actcache.cli import app as cli
from actcache.errors import ActcacheError
from actcache.format import layout
from actcache.read.reader import open_set
from actcache.sets import inventory
from actcache.sets.copy import copy_set
from actcache.storage.store import Store


@pytest.fixture(scope="module")
def made(extracted_set) -> Path:
    """The session's read-only store: one complete set and its token cache (tests work on copies)."""
    return Path(extracted_set).parent


@pytest.fixture
def store(made, tmp_path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(made, copy)
    return copy


def set_url(store: Path) -> str:
    (set_id,) = inventory.set_ids(Store(str(store)))
    return f"{store}/{set_id}"


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code: int, err: str, fragment: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("actcache: error: ") and fragment in lines[0], err


# -- rm ----------------------------------------------------------------------------------------------------
def test_rm_removes_the_set_and_nothing_else(store, capsys):
    url = set_url(store)
    tokens_before = local_tree(store / layout.TOKENS_ROOT)
    code, out, _ = run(capsys, "rm", url, "--yes", "--json")
    assert code == 0 and json.loads(out) == {"removed": url, "files": 9, "bytes": json.loads(out)["bytes"]}  # 4+4+1
    assert not Path(url).exists()
    assert local_tree(store / layout.TOKENS_ROOT) == tokens_before
    code, out, _ = run(capsys, "ls", str(store), "--json")
    assert code == 0 and json.loads(out)["sets"] == []


def test_rm_asks_on_a_terminal(store, capsys, monkeypatch):
    url = set_url(store)

    class Terminal:
        def __init__(self, answer: str):
            self.answer = answer

        def isatty(self) -> bool:
            return True

        def readline(self) -> str:
            return self.answer

    monkeypatch.setattr(sys, "stdin", Terminal("n\n"))
    code, _, err = run(capsys, "rm", url)
    assert code == 1 and "Remove " in err and "complete set" in err and "not removed" in err
    assert (Path(url) / layout.MANIFEST).exists()
    monkeypatch.setattr(sys, "stdin", Terminal("y\n"))
    code, out, _ = run(capsys, "rm", url)
    assert code == 0 and out.startswith(f"removed {url}") and not Path(url).exists()


REFUSED = [
    (["rm", "{set}"], "stdin is not a terminal; pass --yes"),
    (["rm", "{set}", "--json"], "--json cannot answer a confirmation prompt; add --yes"),
    (["rm", "{store}", "--yes"], "is a store, not a set"),
    (["rm", "{store}/", "--yes"], "is a store, not a set"),
    (["rm", "{tokens}", "--yes"], "is a token cache, not a set"),
    (["rm", "{store}/0123456789abcdef01234567", "--yes"], "no activation set at"),
    (["rm", "{set}/shards", "--yes"], "is not a set"),
    (["rm", "{stranger}", "--yes"], "holds files that are not part of a set ('notes.txt')"),
    (["gc", "{set}"], "is a set, not a store"),
    (["gc", "{store}/shards-elsewhere"], "does not exist"),
    (["gc", "{empty}"], "is not an actcache store"),
    (["gc", "{store}", "--older-than", "-1"], "--older-than must be >= 0"),
]


@pytest.mark.parametrize("argv,expected", REFUSED, ids=[" ".join(a[:2]) + f": {e}" for a, e in REFUSED])
def test_refused_in_one_line_touching_nothing(store, tmp_path, capsys, monkeypatch, argv, expected):
    monkeypatch.setattr(sys, "stdin", open(os.devnull))  # noqa: SIM115 - closed with the test
    url = set_url(store)
    stranger = store / "fedcba9876543210fedcba98"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    (tmp_path / "empty").mkdir()
    (tid,) = inventory.token_cache_ids(Store(str(store)))
    before = local_tree(tmp_path)
    fill = {
        "set": url,
        "store": str(store),
        "tokens": f"{store}/{layout.TOKENS_ROOT}/{tid}",
        "stranger": str(stranger),
        "empty": str(tmp_path / "empty"),
    }
    code, _, err = run(capsys, *[a.format(**fill) for a in argv])
    one_line_error(code, err, expected)
    assert local_tree(tmp_path) == before


def _rm_killed_at(point: str, url: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {}), "ACTCACHE_FAULT": f"{point}:1"}
    return subprocess.run(
        [sys.executable, "-m", "actcache.cli.app", "rm", url, "--yes"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.subprocess
@pytest.mark.parametrize("point", crashpoints.RM_POINTS)
def test_a_killed_rm_never_leaves_a_complete_looking_set(store, point, capsys):
    url = set_url(store)
    killed = _rm_killed_at(point, url)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    entry = inventory.describe_set(Store(str(store)), url.rsplit("/", 1)[1])
    assert entry is None or entry.state == inventory.INCOMPLETE
    with pytest.raises(ActcacheError, match="no activation set|is an unfinished set"):
        open_set(url)
    code, _, _ = run(capsys, "rm", url, "--yes")  # running it again finishes the job
    assert code == 0 and not Path(url).exists()


@pytest.mark.subprocess
def test_extraction_after_a_killed_rm_gives_the_same_set(made, store, make_config, prefect_harness):
    from actcache.api import extract

    url = set_url(store)
    assert _rm_killed_at("rm.records-removed", url).returncode == -signal.SIGKILL
    again = extract(make_config(max_tokens=448, store=str(store)))  # the extracted_set's config
    assert again == url and local_tree(store) == local_tree(made)


@pytest.mark.subprocess
@pytest.mark.parametrize("point", crashpoints.RM_POINTS)
def test_rm_on_s3_killed_then_finished(made, s3_server, s3_env, point, capsys):
    bucket_url = s3_server.new_prefix()
    url = copy_set(set_url(made), bucket_url).url
    assert _rm_killed_at(point, url).returncode == -signal.SIGKILL
    entry = inventory.describe_set(Store(bucket_url), url.rsplit("/", 1)[1])
    if entry is None:  # killed after the last object went: an object store has no folder left to remove
        assert point == crashpoints.RM_POINTS[-1] and s3_server.keys_under(bucket_url) == {}
        return
    assert entry.state == inventory.INCOMPLETE
    code, _, _ = run(capsys, "rm", url, "--yes")
    assert code == 0 and s3_server.keys_under(bucket_url) == {}


# -- gc ----------------------------------------------------------------------------------------------------
def _lease(folder: Path, host: str, pid: int, start: int | None = None) -> Path:
    """A writer's lease file in the set folder ``folder``, as ``storage.leases`` writes it (renewed now)."""
    lease = folder / layout.writer_file(host, pid, "0badf00d", start)
    lease.parent.mkdir(parents=True, exist_ok=True)
    lease.write_text("{}")
    return lease


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _ended_writer(kind: str) -> tuple[int, int | None]:
    """(pid, start) of a writer of this host that no longer runs: its pid free, or given to another process since
    (this one, which started later than the writer named)."""
    from actcache.storage.housekeeping import me

    if kind == "pid free":
        return _dead_pid(), None
    pid, start = me()
    if start is None:
        pytest.skip("this host does not say when a process started")
    return pid, start - 1


@pytest.mark.subprocess
def test_gc_lists_then_removes_only_garbage(store, capsys):
    from actcache.storage.store import _HOST

    url = set_url(store)
    shards = Path(url) / "shards"
    (tid,) = inventory.token_cache_ids(Store(str(store)))
    set_before = local_tree(Path(url))
    dead = shards / f"000001.safetensors.tmp-{_HOST}-{_dead_pid()}-0badf00d"
    live = shards / f"000002.safetensors.tmp-{_HOST}-{os.getpid()}-0badf00d"
    old_remote = shards / "000003.safetensors.tmp-otherhost-12-0badf00d"
    new_remote = shards / "000000.safetensors.tmp-otherhost-13-0badf00d"
    for p in (dead, live, old_remote, new_remote):
        p.write_bytes(b"x" * 100)
    two_days_ago = time.time() - 2 * 86400
    os.utime(old_remote, (two_days_ago, two_days_ago))
    unused = store / layout.TOKENS_ROOT / ("t" + "0" * 24)
    shutil.copytree(store / layout.TOKENS_ROOT / tid, unused)
    for f in unused.rglob("*"):  # untouched for longer than --older-than: no extraction is using it
        os.utime(f, (two_days_ago, two_days_ago))
    everything_before = local_tree(store)

    code, out, err = run(capsys, "gc", str(store), "--json")
    report = json.loads(out)
    assert code == 0 and report["removed"] is False
    found = {(g["kind"], g["url"]) for g in report["items"]}
    assert found == {("temp-file", str(dead)), ("temp-file", str(old_remote)), ("token-cache", str(unused))}
    assert report["bytes"] == 200 + sum(f.stat().st_size for f in unused.rglob("*") if f.is_file())
    assert local_tree(store) == everything_before, "without --yes, gc only lists"

    code, _, err = run(capsys, "gc", str(store), "--yes")
    assert code == 0 and "removed 3 item(s)" in err
    assert not dead.exists() and not old_remote.exists() and not unused.exists()
    assert live.exists() and new_remote.exists() and (store / layout.TOKENS_ROOT / tid).exists()
    for p in (live, new_remote):
        p.unlink()
    assert local_tree(Path(url)) == set_before, "a set's files are never garbage"


def test_gc_keeps_token_caches_while_a_set_has_no_manifest(store, capsys):
    url = set_url(store)
    (Path(url) / layout.MANIFEST).unlink()  # as while its first extraction runs
    unused = store / layout.TOKENS_ROOT / ("t" + "0" * 24)
    unused.mkdir()
    (unused / "index.json").write_text("{}")
    code, out, _ = run(capsys, "gc", str(store), "--yes", "--json")
    report = json.loads(out)
    assert code == 0 and report["items"] == [] and unused.exists()
    assert "without a readable manifest" in report["notes"][0]


def test_gc_on_s3_aborts_old_uploads_and_unused_token_caches(made, s3_server, s3_env, capsys):
    bucket_url = s3_server.new_prefix()
    set_id = copy_set(set_url(made), bucket_url).url.rsplit("/", 1)[1]
    prefix = bucket_url.removeprefix(f"s3://{s3_server.bucket}/")
    c = s3_server.client()
    c.put_object(Bucket=s3_server.bucket, Key=f"{prefix}/{layout.TOKENS_ROOT}/t{'0' * 24}/index.json", Body=b"{}")
    key = f"{prefix}/{set_id}/{layout.shard_file(9, 'none')}"
    upload = c.create_multipart_upload(Bucket=s3_server.bucket, Key=key)["UploadId"]
    c.upload_part(Bucket=s3_server.bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"y" * 1000)
    before = s3_server.keys_under(bucket_url)

    # moto dates every upload 2010-11-10: a threshold of ~114 years makes it recent, 0 makes it abandoned.
    # The token cache was written just now: an extraction may be using it, until it is older than the threshold.
    code, out, _ = run(capsys, "gc", bucket_url, "--json", "--older-than", "1000000")
    report = json.loads(out)
    assert code == 0 and report["items"] == []
    assert any("maybe still running" in n for n in report["notes"])
    assert any("an extraction may be using it" in n for n in report["notes"])

    code, out, _ = run(capsys, "gc", bucket_url, "--older-than", "0", "--yes", "--json")
    report = json.loads(out)
    assert code == 0 and sorted(g["kind"] for g in report["items"]) == ["token-cache", "upload"]
    assert next(g for g in report["items"] if g["kind"] == "upload")["bytes"] == 1000
    assert c.list_multipart_uploads(Bucket=s3_server.bucket, Prefix=prefix).get("Uploads", []) == []
    after = s3_server.keys_under(bucket_url)
    assert after == {k: v for k, v in before.items() if not k.startswith(layout.TOKENS_ROOT)}
    assert open_set(f"{bucket_url}/{set_id}").verify() == []


# -- staying inside the store ------------------------------------------------------------------------------
@pytest.fixture
def other(made, tmp_path) -> Path:
    """A second store, which nothing run on ``store`` may touch."""
    copy = tmp_path / "other"
    shutil.copytree(made, copy)
    return copy


def _old(root: Path) -> None:
    """Every file below ``root`` untouched for two days (no live writer)."""
    then = time.time() - 2 * 86400
    for f in root.rglob("*"):
        os.utime(f, (then, then), follow_symlinks=False)


@pytest.mark.parametrize("link", ["set folder", "shards folder", "shard file"])
def test_rm_never_deletes_through_a_symlink(store, other, capsys, link):
    url = set_url(store)
    set_id = url.rsplit("/", 1)[1]
    there = other / set_id
    if link == "set folder":
        shutil.rmtree(url)
        os.symlink(there, url)
    elif link == "shards folder":
        shutil.rmtree(Path(url) / "shards")
        os.symlink(there / "shards", Path(url) / "shards")
    else:
        shard = Path(url) / layout.shard_file(0, "none")
        shard.unlink()
        os.symlink(there / layout.shard_file(0, "none"), shard)
    before = local_tree(other)
    code, _, err = run(capsys, "rm", url, "--yes")
    one_line_error(code, err, "is a symlink; rm deletes only files inside the store")
    assert local_tree(other) == before
    assert open_set(str(there)).verify() == []


def test_gc_never_deletes_through_a_symlinked_token_folder(store, other, capsys):
    shutil.rmtree(store / layout.TOKENS_ROOT)
    os.symlink(other / layout.TOKENS_ROOT, store / layout.TOKENS_ROOT)
    shutil.rmtree(set_url(store))  # no set uses the linked cache
    shutil.rmtree(store / layout.CONTENT_ROOT)  # its index entries with it (else garbage of their own)
    (store / ("f" * 24)).mkdir()  # still a store: an (empty) set folder
    _old(other)
    before = local_tree(other)
    code, out, _ = run(capsys, "gc", str(store), "--yes", "--older-than", "0", "--json")
    report = json.loads(out)
    assert code == 0 and report["items"] == [] and "is a symlink" in report["notes"][0]
    assert local_tree(other) == before


def test_gc_never_deletes_through_a_symlinked_token_cache(store, other, capsys):
    (tid,) = inventory.token_cache_ids(Store(str(other)))
    unused = store / layout.TOKENS_ROOT / ("t" + "0" * 24)
    os.symlink(other / layout.TOKENS_ROOT / tid, unused)
    _old(other)
    before = local_tree(other)
    code, out, _ = run(capsys, "gc", str(store), "--yes", "--older-than", "0", "--json")
    report = json.loads(out)
    assert code == 0 and report["items"] == []
    assert local_tree(other) == before


@pytest.mark.subprocess
def test_gc_deletes_only_temp_files_actcache_writes_where_it_writes_them(store, capsys):
    from actcache.storage.store import _HOST

    url = set_url(store)
    dead = _dead_pid()
    notes = store / "notes"
    notes.mkdir()
    users = [
        notes / f"thesis.tex.tmp-{_HOST}-{dead}-draft",  # a user's file that looks like a temp file
        notes / f"000001.safetensors.tmp-{_HOST}-{dead}-0badf00d",  # a temp name, in a folder that is not a set
        Path(url) / f"notes.txt.tmp-{_HOST}-{dead}-0badf00d",  # inside a set, but not a set's file
        store / f"manifest.json.tmp-{_HOST}-{dead}-0badf00d",  # at the root, where actcache writes no manifest
    ]
    ours = Path(url) / f"{layout.shard_file(1, 'none')}.tmp-{_HOST}-{dead}-0badf00d"
    for p in [*users, ours]:
        p.write_bytes(b"mine")
    code, out, _ = run(capsys, "gc", str(store), "--yes", "--json")
    report = json.loads(out)
    assert code == 0 and [g["url"] for g in report["items"]] == [str(ours)]
    assert not ours.exists() and all(p.read_bytes() == b"mine" for p in users)


def test_gc_keeps_the_token_cache_of_an_extraction_whose_set_folder_does_not_exist_yet(store, capsys):
    from actcache.storage.store import _HOST

    shutil.rmtree(set_url(store))  # the extraction has tokenized, and written no shard yet
    shutil.rmtree(store / layout.CONTENT_ROOT)  # its index entries with it (else garbage of their own)
    (store / ("f" * 24)).mkdir()
    (tid,) = inventory.token_cache_ids(Store(str(store)))
    cache = store / layout.TOKENS_ROOT / tid
    before = local_tree(cache)
    code, out, _ = run(capsys, "gc", str(store), "--yes", "--json")  # the default threshold: a day
    report = json.loads(out)
    assert code == 0 and report["items"] == [] and "an extraction may be using it" in report["notes"][0]
    assert local_tree(cache) == before

    _old(cache)  # untouched for days, yet a live process of this host is writing into it
    (cache / f"{layout.shard_file(9, 'none')}.tmp-{_HOST}-{os.getpid()}-0badf00d").write_bytes(b"x")
    code, out, _ = run(capsys, "gc", str(store), "--yes", "--older-than", "0", "--json")
    report = json.loads(out)
    assert code == 0 and report["items"] == [] and f"process {os.getpid()} of this host" in report["notes"][0]
    assert cache.exists()

    next(cache.glob("shards/*.tmp-*")).unlink()  # the writer is gone, the cache old: now it is garbage
    code, out, _ = run(capsys, "gc", str(store), "--yes", "--older-than", "0", "--json")
    assert code == 0 and [g["kind"] for g in json.loads(out)["items"]] == ["token-cache"] and not cache.exists()


def test_gc_on_s3_keeps_a_token_cache_holding_files_actcache_does_not_write(made, s3_server, s3_env, capsys):
    bucket_url = s3_server.new_prefix()
    copy_set(set_url(made), bucket_url)
    prefix = bucket_url.removeprefix(f"s3://{s3_server.bucket}/")
    c = s3_server.client()
    tokens = f"{prefix}/{layout.TOKENS_ROOT}/t{'0' * 24}"
    c.put_object(Bucket=s3_server.bucket, Key=f"{tokens}/index.json", Body=b"{}")
    c.put_object(Bucket=s3_server.bucket, Key=f"{tokens}/notes.txt", Body=b"mine")
    before = s3_server.keys_under(bucket_url)
    code, out, _ = run(capsys, "gc", bucket_url, "--older-than", "0", "--yes", "--json")
    report = json.loads(out)
    assert code == 0 and report["items"] == [] and any("'notes.txt'" in n for n in report["notes"])
    assert s3_server.keys_under(bucket_url) == before


# -- a read-only store -------------------------------------------------------------------------------------
def _read_only(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """``actcache ARGS`` with ``folder`` mounted read-only (a private mount namespace: nothing else sees it)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot make a mount namespace here")
    script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"'
    cmd = ["unshare", "-m", "sh", "-c", script, str(folder), sys.executable, "-m", "actcache.cli", *args]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.subprocess
def test_a_read_only_store_serves_a_complete_set_and_refuses_rm_and_gc_in_one_line(store, tiny_models, corpus):
    from actcache.storage.store import _HOST

    url = set_url(store)
    (Path(url) / f"{layout.shard_file(1, 'none')}.tmp-{_HOST}-{_dead_pid()}-0badf00d").write_bytes(b"x")
    before = local_tree(store)
    extract = ["extract", "--model", str(tiny_models["gpt2"]), "--hook", "blocks.1.hook_resid_post"]
    extract += ["--dataset", str(corpus), "--context-size", "32", "--max-tokens", "448", "--shard-tokens", "128"]
    extract += ["--batch-size", "4", "--store", str(store), "--device", "cpu"]
    done = _read_only(store, *extract)
    assert done.returncode == 0 and done.stdout.strip() == url, done.stderr[-3000:]
    for argv in (["rm", url, "--yes"], ["gc", str(store), "--yes"]):
        refused = _read_only(store, *argv)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1, refused.stderr
        assert "Read-only file system" in lines[0] and "the store is read-only" in lines[0], lines
    assert local_tree(store) == before


# -- rm and live writers ----------------------------------------------------------------------------------------
def _hung_writer(args: list[str], point: str, appears: Path) -> subprocess.Popen:
    """``actcache ARGS`` in a subprocess, stalled for good at ``point`` (``crashpoints``), once ``appears`` exists."""
    env = {**os.environ, "ACTCACHE_FAULT": f"{point}:hang"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "actcache.cli.app", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while not appears.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else proc.returncode
        assert time.monotonic() < deadline, f"{appears} never appeared"
        time.sleep(0.2)
    time.sleep(0.5)  # at its point by now: it writes nothing until killed
    return proc


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def _refused_for(capsys, url: str, pid: int) -> None:
    code, _, err = run(capsys, "rm", url, "--yes")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert f"is being written by process {pid} of this host" in lines[0] and "/writers/" in lines[0], err
    assert "wait for it to end or stop it, then rerun rm" in lines[0], err


@pytest.mark.subprocess
@pytest.mark.parametrize("writer", ["shuffle", "cp"])
def test_rm_refuses_a_set_a_live_shuffle_or_cp_writes_and_removes_it_once_the_writer_is_gone(
    made, tmp_path, capsys, writer
):
    """`rm --yes` during a shuffle or cp said "removed", and the writer then wrote the rest of the set again (half a
    set, or one that looked complete). Every writer holds a lease in the set's folder: rm refuses in one line naming
    the live process, touching nothing; once the writer is dead, rm removes the set, lease included."""
    out = tmp_path / "out"
    if writer == "shuffle":
        args = ["shuffle", set_url(made), "--out", str(out), "--shard-rows", "100", "--seed", "3"]
        point = "shuffle.shard-written:2"
    else:
        args, point = ["cp", set_url(made), str(out), "--jobs", "1"], "cp.shard-written:2"
    proc = _hung_writer(args, point, out)
    try:
        (sid,) = [p.name for p in out.iterdir() if inventory.is_set_id(p.name)]
        url = f"{out}/{sid}"
        while not list((out / sid / "shards").glob("*.safetensors*")):
            time.sleep(0.2)
        time.sleep(0.5)
        before = local_tree(out)
        _refused_for(capsys, url, proc.pid)
        assert local_tree(out) == before, "a refused rm touches nothing"
    finally:
        _kill(proc)
    code, out_text, err = run(capsys, "rm", url, "--yes")
    assert code == 0 and "removed" in out_text, err
    assert not (out / sid).exists()


@pytest.mark.subprocess
def test_rm_on_s3_refuses_a_set_a_live_cp_writes(made, s3_server, s3_env, capsys):
    bucket_url = s3_server.new_prefix()
    (sid,) = inventory.set_ids(Store(str(made)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "actcache.cli.app", "cp", set_url(made), bucket_url, "--jobs", "1"],
        env={**os.environ, "ACTCACHE_FAULT": "cp.shard-written:2:hang"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not any(k.startswith("shards/") for k in s3_server.keys_under(f"{bucket_url}/{sid}")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            assert time.monotonic() < deadline, "no shard copied"
            time.sleep(0.2)
        time.sleep(1)
        keys = s3_server.keys_under(bucket_url)
        assert any(k.startswith(f"{sid}/writers/") for k in keys), keys
        _refused_for(capsys, f"{bucket_url}/{sid}", proc.pid)
        assert s3_server.keys_under(bucket_url) == keys
    finally:
        _kill(proc)
    code, _, err = run(capsys, "rm", f"{bucket_url}/{sid}", "--yes")
    assert code == 0 and s3_server.keys_under(bucket_url) == {}, err


def test_rm_judges_another_hosts_lease_by_its_age(store, capsys):
    """Another host's pid cannot be checked: its lease counts while it was renewed within ``STALE_S``."""
    from actcache.storage import leases

    url = set_url(store)
    lease = _lease(Path(url), "otherhost", 4242)
    code, _, err = run(capsys, "rm", url, "--yes")
    assert code == 1 and "is being written by host otherhost (pid 4242, lease renewed" in err, err
    old = time.time() - leases.STALE_S - 60
    os.utime(lease, (old, old))
    code, _, err = run(capsys, "rm", url, "--yes")
    assert code == 0 and not Path(url).exists(), err


@pytest.mark.subprocess
@pytest.mark.parametrize("kind", ["pid free", "pid reused"])
def test_rm_ignores_the_lease_of_a_dead_writer_of_this_host(store, capsys, kind):
    from actcache.storage.store import _HOST

    url = set_url(store)
    _lease(Path(url), _HOST, *_ended_writer(kind))
    code, _, err = run(capsys, "rm", url, "--yes")
    assert code == 0 and not Path(url).exists(), err


def test_gc_keeps_every_token_cache_while_a_writer_holds_a_lease(store, capsys):
    """A writer takes its lease before it tokenizes (an extraction) or reads anything: its set folder holds the lease
    from then on, so gc sees a set without a manifest and keeps every token cache, even one untouched for days."""
    from actcache.storage import leases

    unused = store / layout.TOKENS_ROOT / ("t" + "0" * 24)
    (tid,) = inventory.token_cache_ids(Store(str(store)))
    shutil.copytree(store / layout.TOKENS_ROOT / tid, unused)
    two_days_ago = time.time() - 2 * 86400
    for f in unused.rglob("*"):
        os.utime(f, (two_days_ago, two_days_ago))
    with leases.hold(Store(str(store)), "ab" * 12):
        code, out, _ = run(capsys, "gc", str(store), "--yes", "--json")
        report = json.loads(out)
        assert code == 0 and report["items"] == [] and unused.exists(), report
        assert "abababababababababababab" in report["notes"][0], report
    assert not (store / ("ab" * 12)).exists(), "the lease and the folders it made go with it"
    code, out, _ = run(capsys, "gc", str(store), "--yes", "--json")
    assert code == 0 and not unused.exists()


def test_gc_keeps_another_hosts_temp_files_while_that_host_holds_a_lease(store, capsys):
    """Another host's pid cannot be checked: its old temp file went with ``--older-than 0`` even while that host
    held a live lease on a set of the store (an extraction writing a shard there). Kept until the lease is stale."""
    from actcache.storage import leases

    url = set_url(store)
    tmp = Path(url) / f"{layout.shard_file(1, 'none')}.tmp-otherhost-4242-0badf00d"
    tmp.write_bytes(b"half a shard")
    days = time.time() - 2 * 86400
    os.utime(tmp, (days, days))
    lease = _lease(Path(url), "otherhost", 4242)
    code, out, err = run(capsys, "gc", str(store), "--yes", "--older-than", "0", "--json")
    report = json.loads(out)
    assert code == 0 and report["items"] == [] and tmp.exists(), err
    assert any("host otherhost holds a live lease on" in n for n in report["notes"]), report
    stale = time.time() - leases.STALE_S - 60
    os.utime(lease, (stale, stale))
    code, out, err = run(capsys, "gc", str(store), "--yes", "--older-than", "0", "--json")
    kinds = sorted(g["kind"] for g in json.loads(out)["items"])
    assert code == 0 and kinds == ["lease", "temp-file"] and not tmp.exists() and not lease.exists(), err


@pytest.mark.subprocess
@pytest.mark.parametrize("writer", ["ended", "live"])
def test_gc_collects_the_lease_a_killed_writer_left_and_what_it_held_back(store, capsys, writer):
    """A writer killed before its first shard leaves a set folder holding only its lease: `ls` counted it as an
    unfinished set and `gc` kept every token cache for it, for ever. Its lease is garbage once its process no
    longer runs (the folder goes with it, and the token caches are judged again); a live writer's is kept."""
    from actcache.storage.store import _HOST

    shutil.rmtree(set_url(store))  # its token cache is now unused
    shutil.rmtree(store / layout.CONTENT_ROOT)  # its index entries with it (else garbage of their own)
    (tid,) = inventory.token_cache_ids(Store(str(store)))
    _old(store / layout.TOKENS_ROOT / tid)
    # A live writer is another process (a lease of this one that it does not hold is over: storage.leases).
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) if writer == "live" else None
    pid = _dead_pid() if alive is None else alive.pid
    folder = store / ("e" * 24)
    lease = _lease(folder, _HOST, pid)
    try:
        code, out, err = run(capsys, "gc", str(store), "--yes", "--json")
    finally:
        if alive is not None:
            alive.kill()
            alive.wait()
    report = json.loads(out)
    assert code == 0, err
    if writer == "ended":
        assert sorted(g["kind"] for g in report["items"]) == ["lease", "token-cache"], report
        assert not folder.exists() and not (store / layout.TOKENS_ROOT / tid).exists()
    else:
        assert report["items"] == [] and lease.exists(), report
        assert any("without a readable manifest" in n for n in report["notes"]), report


@pytest.mark.subprocess
@pytest.mark.parametrize("kind", ["pid free", "pid reused"])
def test_gc_collects_an_ended_writers_lease_and_temp_file_inside_a_complete_set(store, capsys, kind):
    """A killed writer's pid may be given to another process within minutes (pids wrap on a busy host): its files
    are still garbage, the later process is not taken for the writer."""
    from actcache.storage.store import _HOST

    url = set_url(store)
    pid, start = _ended_writer(kind)
    lease = _lease(Path(url), _HOST, pid, start)
    tmp = Path(url) / layout.temp_name(layout.shard_file(1, "none"), _HOST, pid, "0badf00d", start)
    tmp.write_bytes(b"x")
    code, out, err = run(capsys, "gc", str(store), "--yes", "--json")
    assert code == 0 and sorted(g["kind"] for g in json.loads(out)["items"]) == ["lease", "temp-file"], err
    assert not tmp.exists()
    assert not lease.parent.exists() and open_set(url).verify() == []


def test_gc_collects_content_entries_of_sets_no_longer_there(store, capsys):
    """A set whose manifest could not be read when `rm` removed it (or removed by hand) leaves its content index
    entries behind: lookups ignore them, and gc removes them. An entry of a set still there, and a file in
    `_content/` that actcache did not write, are kept."""
    url = set_url(store)
    entries = sorted((store / layout.CONTENT_ROOT).glob("*.json"))
    assert entries, "the extracted set is indexed by content"
    foreign = store / layout.CONTENT_ROOT / "notes.json"
    foreign.write_text("{}")
    code, out, err = run(capsys, "gc", str(store), "--json")
    assert code == 0 and json.loads(out)["items"] == [], err

    (Path(url) / layout.MANIFEST).write_text("not json")  # rm cannot read which entries name it
    code, _, err = run(capsys, "rm", url, "--yes")
    assert code == 0 and not Path(url).exists(), err
    assert all(e.exists() for e in entries), "the entries rm could not know of are left"
    code, out, err = run(capsys, "gc", str(store), "--yes", "--json")
    kinds = [g["kind"] for g in json.loads(out)["items"]]
    assert code == 0 and kinds.count("content-entry") == len(entries), err
    assert not any(e.exists() for e in entries) and foreign.exists()
