"""The store layer against a real S3 endpoint (moto_server over HTTP): writes, listings, one-line errors."""

from __future__ import annotations

import os
import socket

import pytest

from actcache.errors import ActcacheError
from actcache.storage.failures import StoreUnavailable
from actcache.storage.retry import is_transient
from actcache.storage.store import S3_CONNECT_TIMEOUT, S3_READ_TIMEOUT, Store


def test_round_trip_through_aws_endpoint_url(s3_server, s3_env):
    url = s3_server.new_prefix()
    store = Store(url)  # endpoint and credentials from AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID only
    store.check_writable()
    store.write_bytes("set/shards/000000.safetensors", b"abc")
    store.write_json("set/done/000000.json", {"x": 1})
    listing = store.listing("set")
    assert sorted(listing) == ["done/000000.json", "shards/000000.safetensors"]
    assert listing["shards/000000.safetensors"].size == 3
    prefix = url.removeprefix(f"s3://{s3_server.bucket}/")
    head = s3_server.client().head_object(Bucket=s3_server.bucket, Key=f"{prefix}/set/shards/000000.safetensors")
    assert listing["shards/000000.safetensors"].mtime == head["LastModified"].timestamp()  # the object's own time
    assert store.read_bytes("set/shards/000000.safetensors") == b"abc"
    assert store.list_dirs() == ["set"]
    assert sorted(s3_server.keys_under(url)) == ["set/done/000000.json", "set/shards/000000.safetensors"]
    with pytest.raises(FileNotFoundError):
        store.read_bytes("set/shards/000001.safetensors")  # a missing object stays "not there", not an error


def test_endpoint_from_storage_options(s3_server, s3_env, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    url = s3_server.new_prefix()
    Store(url, {"endpoint_url": s3_server.endpoint}).write_bytes("a/b", b"xyz")
    assert s3_server.keys_under(url) == {"a/b": b"xyz"}


def test_listing_sees_objects_written_by_another_client(s3_server, s3_env):
    url = s3_server.new_prefix()
    store = Store(url)
    assert store.listing("set") == {}
    prefix = url.removeprefix(f"s3://{s3_server.bucket}/")
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=f"{prefix}/set/x", Body=b"1")
    assert list(store.listing("set")) == ["x"]  # no stale s3fs listing cache


def test_large_object_goes_up_in_parts_and_completes(s3_server, s3_env):
    url = s3_server.new_prefix()
    store = Store(url)
    store.part_size = 5 << 20  # S3's smallest part
    data = os.urandom(12 << 20)
    store.write_bytes("big.bin", data)
    prefix = url.removeprefix(f"s3://{s3_server.bucket}/")
    c = s3_server.client()
    etag = c.head_object(Bucket=s3_server.bucket, Key=f"{prefix}/big.bin")["ETag"]
    assert etag.strip('"').endswith("-3"), etag  # a completed 3-part upload, not a single PUT
    assert store.read_bytes("big.bin") == data
    assert not c.list_multipart_uploads(Bucket=s3_server.bucket, Prefix=prefix).get("Uploads")
    store.write_bytes("small.bin", data[: 1 << 20])
    assert "-" not in c.head_object(Bucket=s3_server.bucket, Key=f"{prefix}/small.bin")["ETag"]


def test_a_buffer_goes_up_in_parts_without_a_whole_copy(s3_server, s3_env, monkeypatch):
    """A shard's buffer (a memoryview) is uploaded part by part: no part is ever bigger than part_size, the object
    is the buffer's bytes, and a failure part-way completes nothing."""
    import numpy as np

    from actcache.storage import store as store_mod

    url = s3_server.new_prefix()
    store = Store(url)
    store.part_size = 5 << 20
    buf = np.frombuffer(os.urandom((11 << 20) + 3), np.uint8).copy()
    sliced = []
    real = store_mod._Parts.__getitem__

    def spy(self, part):
        sliced.append(part.stop - part.start)
        return real(self, part)

    monkeypatch.setattr(store_mod._Parts, "__getitem__", spy)
    store.write_bytes("set/big.bin", memoryview(buf))
    assert store.read_bytes("set/big.bin") == buf.tobytes()
    assert max(sliced) == store.part_size and len(sliced) == 3
    prefix = url.removeprefix(f"s3://{s3_server.bucket}/")
    c = s3_server.client()

    # The endpoint goes away at the second part's request, after the first part is in (one part at a time: no
    # part is still in flight when s3fs aborts the upload).
    from s3fs import S3FileSystem

    call_s3 = S3FileSystem._call_s3
    sent = []

    async def broken(self, method, *args, **kwargs):
        if method == "upload_part":
            sent.append(kwargs["PartNumber"])
            if kwargs["PartNumber"] == 2:
                raise ConnectionResetError("the endpoint went away")
        return await call_s3(self, method, *args, **kwargs)

    monkeypatch.setattr(S3FileSystem, "_call_s3", broken)
    store.part_concurrency = 1
    with pytest.raises((StoreUnavailable, ConnectionResetError)):
        store.write_bytes("set/half.bin", memoryview(buf))
    assert sent[:2] == [1, 2] and 3 not in sent, sent
    assert "half.bin" not in store.listing("set")
    assert not c.list_multipart_uploads(Bucket=s3_server.bucket, Prefix=prefix).get("Uploads")


def test_unfinished_multipart_upload_is_invisible(s3_server, s3_env):
    """What an upload killed mid-way leaves behind: parts, but no object and so nothing counted as done."""
    url = s3_server.new_prefix()
    prefix = url.removeprefix(f"s3://{s3_server.bucket}/")
    c = s3_server.client()
    key = f"{prefix}/set/shards/000000.safetensors"
    mpu = c.create_multipart_upload(Bucket=s3_server.bucket, Key=key)
    c.upload_part(Bucket=s3_server.bucket, Key=key, UploadId=mpu["UploadId"], PartNumber=1, Body=b"x" * (5 << 20))
    store = Store(url)
    assert store.listing("set") == {}
    with pytest.raises(FileNotFoundError):
        store.read_bytes("set/shards/000000.safetensors")


def test_missing_bucket_is_one_clear_line(s3_server, s3_env):
    store = Store(f"s3://no-such-bucket-{os.getpid()}/sets")
    with pytest.raises(ActcacheError, match=r"bucket 'no-such-bucket-\d+' does not exist .*create it") as e:
        store.check_writable()
    assert not is_transient(e.value)
    with pytest.raises(ActcacheError, match="does not exist"):
        store.write_bytes("x", b"1")


def test_wrong_credentials_are_rejected_without_echoing_them(s3_server, s3_env, monkeypatch):
    key, _ = s3_server.keys["writer"]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = Store(s3_server.new_prefix(), {"skip_instance_cache": True})
    with pytest.raises(ActcacheError, match=r"rejected the credentials .*SignatureDoesNotMatch") as e:
        store.check_writable()
    assert "not-the-secret" not in str(e.value) and key not in str(e.value)
    assert not is_transient(e.value)


def test_unknown_access_key(s3_server, s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
    store = Store(s3_server.new_prefix(), {"skip_instance_cache": True})
    with pytest.raises(ActcacheError, match=r"rejected the credentials .*InvalidAccessKeyId"):
        store.listing("")


def test_access_denied_on_write_is_not_retried(s3_server, s3_env, monkeypatch):
    for k, v in s3_server.env("reader").items():
        monkeypatch.setenv(k, v)
    store = Store(s3_server.new_prefix(), {"skip_instance_cache": True})
    store.check_writable()  # the reader may list
    with pytest.raises(ActcacheError, match=r"access denied while writing .*AccessDenied") as e:
        store.write_bytes("x", b"1")
    assert not is_transient(e.value)


def test_no_credentials_at_all(s3_server, s3_env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = Store(s3_server.new_prefix(), {"skip_instance_cache": True})
    with pytest.raises(ActcacheError, match="no usable credentials .*AWS_ACCESS_KEY_ID"):
        store.check_writable()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_unreachable_endpoint_fails_fast_but_counts_as_transient(s3_env, monkeypatch):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    store = Store("s3://bucket/prefix", {"skip_instance_cache": True})
    with pytest.raises(StoreUnavailable, match=f"cannot reach {endpoint} while listing s3://bucket/prefix;") as e:
        store.check_writable()
    # What keeps it fast (not a timing, which a loaded machine would break): the client got bounded retries and
    # connect and read timeouts instead of botocore's legacy backoff of up to ~15 s per call (docs/trust.md).
    config = store.fs._s3.meta.config
    assert config.retries == {"mode": "standard", "total_max_attempts": 4}  # botocore's "max_attempts": 3 retries
    assert (config.connect_timeout, config.read_timeout) == (S3_CONNECT_TIMEOUT, S3_READ_TIMEOUT) == (5, 8)
    # Before a run it stops the command; inside the upload task the same error is retried.
    assert is_transient(e.value)


def test_is_transient_on_real_errors(s3_server, s3_env):
    c = s3_server.client()
    with pytest.raises(Exception) as denied:
        c.get_object(Bucket=s3_server.bucket, Key="no/such/key")
    assert not is_transient(denied.value)
    import boto3

    dead = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{_closed_port()}",
        region_name="us-east-1",
        config=__import__("botocore.config").config.Config(retries={"max_attempts": 1}),
    )
    with pytest.raises(Exception) as refused:
        dead.list_buckets()
    assert type(refused.value).__name__ == "EndpointConnectionError"
    assert is_transient(refused.value)


def test_reads_stop_at_the_expected_size_on_s3_too(s3_server, s3_env):
    """A ranged GET: never more than the recorded size is downloaded, and an empty object is no exception."""
    from actcache.storage.store import DamagedFile

    store = Store(s3_server.new_prefix())
    store.write_bytes("a/x", b"12345")
    store.write_bytes("a/empty", b"")
    assert store.read_bytes("a/x", size=5) == b"12345"
    with pytest.raises(DamagedFile, match="larger than 3 bytes"):
        store.read_bytes("a/x", size=3)
    with pytest.raises(DamagedFile, match="has 0 bytes, expected 5"):
        store.read_bytes("a/empty", size=5)
    assert store.read_bytes("a/empty", limit=10) == b""


# -- issue 21 on S3: deletes and listings name exact keys, inside their folder --------------------------------
@pytest.mark.parametrize("name", ["run[1]", "ru*", "run?"])
def test_deletes_take_keys_literally_never_as_glob_patterns(s3_server, s3_env, name):
    """fsspec's ``rm`` globs its paths: a store at ``run[1]`` deleted ``run1``'s files (another store's), and
    left its own."""
    root = s3_server.new_prefix()
    mine, other = Store(f"{root}/{name}"), Store(f"{root}/run1")
    for store in (mine, other):
        store.write_bytes("s/manifest.json", b"{}")
        store.write_bytes("s/spill/000000.json", b"{}")
    mine.remove(["s/manifest.json"])
    mine.remove_tree("s/spill")
    assert s3_server.keys_under(other.url) == {"s/manifest.json": b"{}", "s/spill/000000.json": b"{}"}
    assert s3_server.keys_under(mine.url) == {}


def test_listing_is_of_files_below_the_folder_only(s3_server, s3_env):
    """Folder markers (a console's zero-byte ``x/``) are no files, an object named like the folder is not in it,
    and ``a//b`` is not ``a/b``: once both were listed as the one file of a set."""
    url = s3_server.new_prefix()
    prefix, c = url.removeprefix(f"s3://{s3_server.bucket}/"), s3_server.client()
    for key, body in [("s/", b""), ("s/shards/", b""), ("s//shards/000000.safetensors", b"x"), ("s", b"obj")]:
        c.put_object(Bucket=s3_server.bucket, Key=f"{prefix}/{key}", Body=body)
    store = Store(url)
    store.write_bytes("s/shards/000000.safetensors", b"abc")
    assert sorted(store.listing("s")) == ["/shards/000000.safetensors", "shards/000000.safetensors"]
    assert store.listing("s")["shards/000000.safetensors"].size == 3
    c.put_object(Bucket=s3_server.bucket, Key=f"{prefix}/lone", Body=b"an object, no folder")
    assert store.listing("lone") == {} and store.is_file("lone") and not store.is_file("s/shards")


def test_remove_tree_and_remove_folder_leave_what_is_not_below(s3_server, s3_env):
    url = s3_server.new_prefix()
    prefix, c = url.removeprefix(f"s3://{s3_server.bucket}/"), s3_server.client()
    for key in ("s/spill", "s/spill-other/x", "s/", "s/spill/", "s/spill/deep/"):
        c.put_object(Bucket=s3_server.bucket, Key=f"{prefix}/{key}", Body=b"" if key.endswith("/") else b"keep")
    store = Store(url)
    store.write_bytes("s/spill/000000.json", b"{}")
    store.remove_tree("s/spill")  # its file and its empty folders' markers; not the object named s/spill
    assert sorted(s3_server.keys_under(url)) == ["s/", "s/spill", "s/spill-other/x"]
    store.remove_folder("s")  # s/ still holds files: its marker stays, as a folder that is not empty does
    assert sorted(s3_server.keys_under(url)) == ["s/", "s/spill", "s/spill-other/x"]


MARKER = "Zq9SECRETMARKERx7"


@pytest.mark.parametrize("options", [{"profile": MARKER}, {"deadline": MARKER}])
@pytest.mark.parametrize("debug", [False, True])
def test_a_storage_option_value_appears_in_no_error(s3_server, s3_env, capsys, options, debug):
    """An option's value may be a pasted secret: botocore's ProfileNotFound quoted it (exit 1, "rerun the same
    command to resume"), and a deadline that is not a number was echoed. Both are bad input, named without it."""
    import json

    from actcache.cli.app import main

    url = s3_server.new_prefix()
    code = main([*(["--debug"] if debug else []), "ls", url, "--storage-options", json.dumps(options)])
    out = capsys.readouterr()
    assert code == 2 and MARKER not in out.out + out.err, out.err
    last = out.err.strip().splitlines()[-1]
    assert last.startswith("actcache: error: ") and ("profile" in last or "deadline" in last), out.err
    assert s3_server.keys_under(url) == {}
