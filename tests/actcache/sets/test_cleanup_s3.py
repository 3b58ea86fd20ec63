"""``actcache rm`` and ``gc`` on S3 (a real moto_server) among objects actcache did not write (issue 21): folder
markers, objects named like a set, doubled slashes, glob characters in the store's prefix, other tools' uploads.
They delete only the keys actcache's layout names, below the set or token cache's own prefix."""

from __future__ import annotations

import json

import pytest

from actcache.cli import app as cli
from actcache.format import layout
from actcache.sets import inventory
from actcache.sets.copy import copy_set
from actcache.storage.store import Store

TID = f"t{'0' * 24}"


@pytest.fixture
def on_s3(extracted_set, s3_server, s3_env):
    """A fresh S3 store holding a copy of the session's set: (store URL, set URL, its key prefix in the bucket)."""
    store = s3_server.new_prefix()
    url = copy_set(extracted_set, store).url
    return store, url, store.removeprefix(f"s3://{s3_server.bucket}/")


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def put(s3_server, key: str, body: bytes = b"") -> None:
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=key, Body=body)


def one_line(code: int, err: str, fragment: str, exit_code: int = 2) -> None:
    """One error line, the last on stderr (a command's progress line may come before it)."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("actcache: error: ")]
    assert code == exit_code and errors == lines[-1:] and fragment in lines[-1] and "Traceback" not in err, err


def test_rm_in_a_store_named_with_glob_characters_leaves_the_store_it_matches(extracted_set, s3_server, s3_env, capsys):
    """fsspec's ``rm`` globbed the keys: removing a set of ``.../run[1]`` removed ``.../run1``'s copy, not its own."""
    root = s3_server.new_prefix()
    other = copy_set(extracted_set, f"{root}/run1").url
    before = s3_server.keys_under(other)
    mine = copy_set(extracted_set, f"{root}/run[1]").url
    code, _, err = run(capsys, "rm", mine, "--yes")
    assert code == 0, err
    assert s3_server.keys_under(other) == before
    assert s3_server.keys_under(mine) == {}


def test_rm_removes_a_set_with_folder_markers_and_nothing_beside_it(on_s3, s3_server, capsys):
    """A console's zero-byte ``<set>/`` and ``<set>/shards/`` keys made ``rm`` refuse the set (a file named '');
    they go with the set, as empty folders do locally. The store's own marker and a prefix sibling stay."""
    store, url, prefix = on_s3
    set_id = url.rsplit("/", 1)[1]
    for key in (f"{prefix}/", f"{prefix}/{set_id}/", f"{prefix}/{set_id}/shards/"):
        put(s3_server, key)
    put(s3_server, f"{prefix}/{set_id}x/manifest.json", b"{}")  # another tool's, a prefix sibling of the set
    put(s3_server, f"{prefix}-other/{set_id}/manifest.json", b"{}")  # another store, a prefix sibling of this one
    sibling = s3_server.keys_under(f"{store}-other")
    code, _, err = run(capsys, "rm", url, "--yes")
    assert code == 0, err
    assert sorted(k for k in s3_server.keys_under(store) if not k.startswith(layout.CONTENT_ROOT)) == [
        "",
        f"{set_id}x/manifest.json",
    ]
    assert s3_server.keys_under(f"{store}-other") == sibling


def test_rm_refuses_a_set_holding_a_doubled_slash_key(on_s3, s3_server, capsys):
    """``<set>//shards/000000.safetensors`` is another tool's object: it was listed as the set's shard 0 and rm
    said it removed the set while that key stayed below it."""
    store, url, prefix = on_s3
    set_id = url.rsplit("/", 1)[1]
    put(s3_server, f"{prefix}/{set_id}//shards/000000.safetensors", b"not actcache's")
    before = s3_server.keys_under(store)
    code, _, err = run(capsys, "rm", url, "--yes")
    one_line(code, err, "'/shards/000000.safetensors'")
    assert s3_server.keys_under(store) == before


def test_an_object_named_like_a_set_is_not_one(on_s3, s3_server, capsys):
    """An object ``<store>/<24 hex>`` with nothing below it: show and verify called it an unfinished set to finish
    by a rerun (exit 1), rm a folder holding a file named ''; each now says what it is, and nothing is deleted."""
    store, _, prefix = on_s3
    fake = "0123456789abcdef01234567"
    put(s3_server, f"{prefix}/{fake}", b"someone's file")
    before = s3_server.keys_under(store)
    for command in ("show", "verify"):
        code, _, err = run(capsys, command, f"{store}/{fake}")
        one_line(code, err, "no activation set at")
    code, _, err = run(capsys, "rm", f"{store}/{fake}", "--yes")
    one_line(code, err, "is a file (an object of that name), not a set folder")
    code, _, err = run(capsys, "gc", store, "--yes", "--older-than", "0")
    assert code == 0, err
    assert s3_server.keys_under(store) == before
    assert [e.set_id for e in inventory.list_sets(Store(store))] == [url_id(before)]


def url_id(keys: dict[str, bytes]) -> str:
    (manifest,) = [k for k in keys if k.endswith(f"/{layout.MANIFEST}")]
    return manifest.split("/")[0]


def test_gc_aborts_only_uploads_of_files_actcache_writes(on_s3, s3_server, capsys):
    """An old multipart upload of another tool's file in the store (a backup going up) was aborted as garbage."""
    store, url, prefix = on_s3
    c, bucket = s3_server.client(), s3_server.bucket
    ours = f"{prefix}/{url.rsplit('/', 1)[1]}/{layout.shard_file(9, 'none')}"
    theirs = f"{prefix}/backups/big.tar"
    for key in (ours, theirs):
        upload = c.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        c.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"y" * 1000)
    code, out, err = run(capsys, "gc", store, "--yes", "--older-than", "0", "--json")
    report = json.loads(out)
    assert code == 0, err
    assert [g["url"] for g in report["items"]] == [f"s3://{bucket}/{ours}"]
    assert any("backups/big.tar: not a file actcache writes" in n for n in report["notes"])
    assert [u["Key"] for u in c.list_multipart_uploads(Bucket=bucket, Prefix=prefix)["Uploads"]] == [theirs]


def test_gc_collects_an_unused_token_cache_with_its_folder_markers(on_s3, s3_server, capsys):
    """A token cache's zero-byte ``_tokens/<id>/`` marker was taken for a foreign file named '': the cache was
    kept for ever. It goes, markers too; the ``_tokens/`` marker, which marks the folder of every cache, stays."""
    store, _, prefix = on_s3
    tokens = f"{prefix}/{layout.TOKENS_ROOT}"
    for key, body in [(f"{tokens}/", b""), (f"{tokens}/{TID}/", b""), (f"{tokens}/{TID}/index.json", b"{}")]:
        put(s3_server, key, body)
    put(s3_server, f"{tokens}/{TID}x/index.json", b"{}")  # a prefix sibling, not a token cache
    code, out, err = run(capsys, "gc", store, "--yes", "--older-than", "0", "--json")
    assert code == 0, err
    assert [g["kind"] for g in json.loads(out)["items"]] == ["token-cache"]
    left = sorted(k for k in s3_server.keys_under(store) if k.startswith(layout.TOKENS_ROOT))
    assert left == [f"{layout.TOKENS_ROOT}/", f"{layout.TOKENS_ROOT}/{TID}x/index.json"]


def test_shuffle_cleanup_deletes_nothing_of_a_store_its_prefix_globs(extracted_set, s3_server, s3_env, capsys):
    """A shuffle removes spill files left in its complete set: in ``run?`` that removed ``runX``'s too."""
    root = s3_server.new_prefix()
    mine = copy_set(extracted_set, f"{root}/run?").url
    code, out, err = run(capsys, "shuffle", mine)
    assert code == 0, err
    shuffled = out.strip().splitlines()[-1].rsplit("/", 1)[1]
    spill = f"{shuffled}/{layout.spill_record(0)}"
    for store in ("run?", "runX"):  # a kill after the manifest left one in this store; another store's is alike
        put(s3_server, f"{root.split('/', 3)[3]}/{store}/{spill}", b"{}")
    code, _, err = run(capsys, "shuffle", mine)
    assert code == 0, err
    assert spill not in s3_server.keys_under(f"{root}/run?")
    assert s3_server.keys_under(f"{root}/runX") == {spill: b"{}"}


# -- rm beside a writer of the same store: no interleaving leaves a set that looks complete ------------------
def _rm(store: str, set_id: str) -> None:
    """An rm that does not see the writer's lease (``storage.leases``: an rm that takes another host's hung writer's
    lease for stale, or one that listed the set just before the writer took its lease; a live writer's lease makes
    a plain rm refuse, see test_cleanup.py): what is left to keep the set honest is the writer's own checks."""
    from unittest import mock

    from actcache.sets import cleanup
    from actcache.storage import leases

    with mock.patch.object(leases, "live", lambda *args, **kwargs: []):
        cleanup.remove_set(cleanup.find_set(Store(store), set_id))


def test_rm_between_a_copys_last_check_and_its_manifest_leaves_no_complete_set(
    extracted_set, s3_server, s3_env, capsys, monkeypatch
):
    """cp checked its shards, rm removed them all (the set had no manifest to delete yet), then cp wrote its
    manifest: exit 0, and ``ls`` called the set complete while ``verify`` found every shard missing."""
    from actcache.format import commit as commit_module

    store, set_id = s3_server.new_prefix(), extracted_set.rsplit("/", 1)[1]
    check, removed = commit_module._check_present, []

    def check_then_rm(*args):
        check(*args)
        if not removed:
            removed.append(_rm(store, set_id))

    monkeypatch.setattr(commit_module, "_check_present", check_then_rm)
    code, _, err = run(capsys, "cp", extracted_set, store)
    one_line(code, err, "changed while it was written", exit_code=1)
    assert [e.state for e in inventory.list_sets(Store(store))] == []
    assert not any(k.endswith(layout.MANIFEST) for k in s3_server.keys_under(store))
    monkeypatch.undo()
    assert run(capsys, "cp", extracted_set, store)[0] == 0  # the rerun it asks for
    assert run(capsys, "verify", f"{store}/{set_id}")[0] == 0


def test_a_manifest_written_while_rm_runs_goes_with_the_set(extracted_set, s3_server, s3_env, capsys, monkeypatch):
    """rm listed the set, deleted its manifest, and a cp of the same set put its manifest back (its shards all
    there) before rm deleted records and shards: the manifest stayed, over nothing."""
    from actcache import crashpoints

    store = s3_server.new_prefix()
    url = copy_set(extracted_set, store).url
    point = crashpoints.point

    def copy_at(name: str) -> None:
        point(name)
        if name == "rm.manifest-removed":
            copy_set(extracted_set, store)

    monkeypatch.setattr(crashpoints, "point", copy_at)
    code, _, err = run(capsys, "rm", url, "--yes")
    assert code == 0, err
    assert not any(k.startswith(url.rsplit("/", 1)[1]) for k in s3_server.keys_under(store))
    assert inventory.list_sets(Store(store)) == []


def test_a_copy_whose_source_is_removed_says_so(extracted_set, s3_server, s3_env):
    """rm of the source after cp read its last shard: cp ended in a raw ``FileNotFoundError: The specified key does
    not exist`` (and "rerun the same command to resume")."""
    from actcache.errors import Failure

    source = copy_set(extracted_set, s3_server.new_prefix()).url
    store, set_id = source.rsplit("/", 1)
    done = []

    def after_each(_record) -> None:
        done.append(1)
        if len(done) == 4:  # every shard copied: only the source's manifest is left to read
            _rm(store, set_id)

    with pytest.raises(Failure, match="was removed since it was opened"):
        copy_set(source, s3_server.new_prefix(), jobs=1, on_shard=after_each)


def test_a_shuffle_whose_output_is_removed_says_so(extracted_set, s3_server, s3_env, capsys, monkeypatch):
    """rm of the shuffled set while its spill files were being read back: a raw ``FileNotFoundError``."""
    from actcache import crashpoints

    source = copy_set(extracted_set, s3_server.new_prefix()).url
    store = source.rsplit("/", 1)[0]
    point, seen = crashpoints.point, []

    def rm_at(name: str) -> None:
        point(name)
        if name == "shuffle.spill-recorded":
            seen.append(1)
            if len(seen) == 4:  # every source shard spilled: pass 2 reads them back next
                (target,) = {k.split("/")[0] for k in s3_server.keys_under(store) if f"/{layout.SPILL}/" in k}
                _rm(store, target)

    monkeypatch.setattr(crashpoints, "point", rm_at)
    code, _, err = run(capsys, "shuffle", source)
    one_line(code, err, "was removed while it was written", exit_code=1)
    monkeypatch.undo()
    code, out, err = run(capsys, "shuffle", source)  # the rerun it asks for
    assert code == 0 and run(capsys, "verify", out.strip().splitlines()[-1])[0] == 0


def test_a_delete_the_credentials_may_not_make_is_one_line_not_a_success(on_s3, s3_server, capsys, monkeypatch):
    """S3 answers a bulk delete it refuses key by key with 200 and a list of errors, which s3fs drops: with
    credentials that may only read, ``rm`` reported the set removed and deleted nothing."""
    store, url, _ = on_s3
    before = s3_server.keys_under(store)
    key, secret = s3_server.keys["reader"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    no_cache = '{"skip_instance_cache": true}'  # s3fs would reuse a filesystem made with the writer's keys
    code, _, err = run(capsys, "rm", url, "--yes", "--storage-options", no_cache)
    one_line(code, err, "access denied while deleting")
    assert s3_server.keys_under(store) == before


def test_gc_keeps_the_uploads_of_a_set_a_live_writer_holds(on_s3, s3_server, capsys):
    """``--older-than 0`` aborted every multipart upload, a live writer's too (another host's extraction putting
    a shard: its upload then failed). An upload into a set with a live lease is kept whatever the threshold."""
    from actcache.storage import leases

    store, url, prefix = on_s3
    c, bucket = s3_server.client(), s3_server.bucket
    set_id = url.rsplit("/", 1)[1]
    key = f"{prefix}/{set_id}/{layout.shard_file(9, 'none')}"
    upload = c.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    c.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"y" * 1000)
    lease = f"{prefix}/{set_id}/{layout.writer_file('otherhost', 4242, '0badf00d')}"
    put(s3_server, lease, b"{}")
    assert leases.live(Store(store), set_id)
    code, out, err = run(capsys, "gc", store, "--yes", "--older-than", "0", "--json")
    report = json.loads(out)
    assert code == 0 and report["items"] == [], err
    assert any("its set is being written by host otherhost" in n for n in report["notes"]), report
    assert [u["Key"] for u in c.list_multipart_uploads(Bucket=bucket, Prefix=prefix)["Uploads"]] == [key]
    c.delete_object(Bucket=bucket, Key=lease)  # the writer ended
    code, out, err = run(capsys, "gc", store, "--yes", "--older-than", "0", "--json")
    assert code == 0 and [g["kind"] for g in json.loads(out)["items"]] == ["upload"], err
    assert "Uploads" not in c.list_multipart_uploads(Bucket=bucket, Prefix=prefix)
