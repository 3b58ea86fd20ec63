"""``actcache cp`` between local disk and a real S3 endpoint: byte-identical, resumable, checksummed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actcache.cli import app as cli
from actcache.errors import ActcacheError
from actcache.format import content, layout
from actcache.format.key import SetKey
from actcache.sets.copy import copy_set
from actcache.storage.store import StoreRef


@pytest.fixture(scope="module")
def local_set(make_config, tmp_path_factory) -> str:
    """A 4-shard set written by the flow's stages without Prefect (the copy is what these tests are about)."""
    from setwriter import extract_by_stages

    return extract_by_stages(
        make_config(hook="blocks.2.hook_resid_post", store=str(tmp_path_factory.mktemp("copy-store")))
    )


def files(set_url: str) -> dict[str, bytes]:
    root = Path(set_url)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def set_files(keys: dict[str, bytes], set_id: str) -> dict[str, bytes]:
    """The objects of one set among a store's ``keys`` (not its ``_content/`` index), as ``files`` names them."""
    return {k.removeprefix(f"{set_id}/"): v for k, v in keys.items() if k.startswith(f"{set_id}/")}


def cp(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["cp", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_round_trip_local_s3_local(local_set, s3_server, s3_env, tmp_path, capsys):
    set_id = local_set.rsplit("/", 1)[1]
    original = files(local_set)
    bucket_url = s3_server.new_prefix()

    code, out, err = cp(capsys, local_set, bucket_url)
    assert code == 0 and out.strip().splitlines()[-1] == f"{bucket_url}/{set_id}"
    assert "copied 4 shards" in err and "skipped 0" in err
    assert set_files(s3_server.keys_under(bucket_url), set_id) == original
    # The set's content entry comes along, written after its manifest: found by content in the new store too.
    m = json.loads(original["manifest.json"])
    assert content.lookup(StoreRef.of(bucket_url).open(), m["content_id"], SetKey.from_dict(m["key"])) == set_id

    code, _, err = cp(capsys, local_set, bucket_url)  # everything present: nothing copied
    assert code == 0 and "copied 0 shards" in err and "skipped 4" in err

    back = tmp_path / "back"
    code, out, _ = cp(capsys, f"{bucket_url}/{set_id}", str(back))
    assert code == 0 and out.strip().splitlines()[-1] == f"{back}/{set_id}"
    assert files(str(back / set_id)) == original
    assert json.loads((back / "_content" / f"{m['content_id']}.json").read_text())["set_id"] == set_id

    # Lose one shard's object and another's record at the destination: exactly those two are copied again.
    prefix = bucket_url.removeprefix(f"s3://{s3_server.bucket}/")
    c = s3_server.client()
    c.delete_object(Bucket=s3_server.bucket, Key=f"{prefix}/{set_id}/{layout.shard_file(1, 'none')}")
    c.delete_object(Bucket=s3_server.bucket, Key=f"{prefix}/{set_id}/{layout.record_file(3)}")
    result = copy_set(local_set, bucket_url)
    assert (result.copied, result.skipped) == (2, 2)
    assert set_files(s3_server.keys_under(bucket_url), set_id) == original

    assert cli.main(["verify", f"{bucket_url}/{set_id}"]) == 0
    assert "OK: 4 shards, 512 tokens" in capsys.readouterr().out
    assert cli.main(["ls", bucket_url]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].split() == ["SET", "MODEL", "HOOK", "LAYOUT", "TOKENS", "BYTES", "NON-FINITE", "STATE"]
    assert listed[1].split()[0] == set_id and listed[1].split()[2:5] == ["blocks.2.hook_resid_post", "tokens", "512"]
    assert listed[1].split()[-1] == "complete"
    assert cli.main(["show", f"{bucket_url}/{set_id}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_tokens"] == 512


def test_corrupted_source_stops_before_the_manifest(local_set, s3_server, s3_env, tmp_path):
    set_id = local_set.rsplit("/", 1)[1]
    src = tmp_path / "src"
    copy_set(local_set, str(src))
    shard = src / set_id / layout.shard_file(2, "none")
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    dest = s3_server.new_prefix()
    with pytest.raises(ActcacheError, match="shard 2 of .* fails its checksum; the copy stopped"):
        copy_set(str(src / set_id), dest, jobs=1)
    copied = s3_server.keys_under(dest)
    assert f"{set_id}/{layout.MANIFEST}" not in copied
    assert f"{set_id}/{layout.shard_file(2, 'none')}" not in copied


def test_copy_onto_itself_is_refused(local_set):
    with pytest.raises(ActcacheError, match="already in"):
        copy_set(local_set, local_set.rsplit("/", 1)[0])


@pytest.mark.parametrize("dest", ["the set itself", "a folder in the set", "the store through a link"])
def test_a_copy_into_its_own_set_or_store_by_another_name_is_refused(local_set, tmp_path, capsys, dest):
    """A destination store inside the source set would nest a store in the set's folder; the store itself spelled
    through a link is the source. One line each (exit 2), nothing written."""
    before = files(local_set)
    store = Path(local_set).parent
    (tmp_path / "alias").symlink_to(store)
    target = {
        "the set itself": local_set,
        "a folder in the set": f"{local_set}/sub",
        "the store through a link": str(tmp_path / "alias"),
    }[dest]
    code, _, err = cp(capsys, local_set, target)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert ("is inside the set" if "set" in dest else "is already in") in err
    assert files(local_set) == before and not Path(local_set, "sub").exists()


def test_a_destination_that_is_a_file_is_named_so(local_set, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code, _, err = cp(capsys, local_set, str(tmp_path / "f"))
    assert code == 2 and err.strip().endswith("is a file; pass a directory (or a new path) as the destination store")


def test_a_destination_removed_while_it_is_copied_gets_no_manifest(local_set, tmp_path):
    """The destination set deleted while ``cp`` writes it (by hand, or by an ``rm`` that listed it before the copy
    took its lease): the copy used to write the manifest anyway, so ``ls`` called a set with missing shards complete;
    then it wrote the rest of the set again (half a set came back). Now it finds its writer lease gone before its
    next write (``storage.leases``) and stops: one line, exit 1, nothing written again, and the rerun completes it."""
    import shutil

    from actcache.errors import Failure

    set_id = Path(local_set).name
    dest = tmp_path / "dest"
    seen: list[int] = []

    def remove_meanwhile(r) -> None:  # what `actcache rm DEST/<id>` does, between two shards of the copy
        seen.append(r.index)
        if len(seen) == 2:
            shutil.rmtree(dest / set_id)

    with pytest.raises(Failure, match="was removed while this command wrote it .*stopped without writing") as e:
        copy_set(local_set, str(dest), jobs=1, on_shard=remove_meanwhile)
    assert "\n" not in str(e.value)
    assert not [p for p in (dest / set_id).rglob("*") if p.is_file()], "no shard, record or manifest written again"
    copy_set(local_set, str(dest), jobs=1)
    assert files(str(dest / set_id)) == files(local_set)


@pytest.mark.parametrize("dest", ["_tokens", "_content", "another store's set", "a dangling link"])
def test_a_destination_inside_a_stores_own_layout_is_refused(local_set, tmp_path, capsys, dest):
    """A store nested in a set's folder, ``_tokens`` or ``_content`` (of any store) would mix with files whose names
    actcache owns, there; a dangling link would be written through. One line each (exit 2), nothing written."""
    store = Path(local_set).parent
    set_id = Path(local_set).name
    other = tmp_path / "other"
    copy_set(local_set, str(other), jobs=1)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    target = {
        "_tokens": store / layout.TOKENS_ROOT,
        "_content": store / layout.CONTENT_ROOT / "x",
        "another store's set": other / set_id / "nested",
        "a dangling link": tmp_path / "dangling",
    }[dest]
    before = files(str(store)), files(str(other))
    code, _, err = cp(capsys, local_set, str(target))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert ("dangling symlink" if "link" in dest else "a folder of a store's own layout") in err
    assert (files(str(store)), files(str(other))) == before and not (tmp_path / "nowhere").exists()


def test_ls_shows_a_partial_set_on_s3(s3_server, s3_env, capsys, make_config, prefect_harness):
    """One partition of a fan-out run writes a manifest for half the shards: ls says partial."""
    from actcache.flows.extract import extract_activations

    url = s3_server.new_prefix()
    extract_activations(make_config(hook="blocks.2.hook_resid_post", store=url), partition_index=0, num_partitions=2)
    assert cli.main(["ls", url]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[3:5] == ["tokens", "256"] and " ".join(row[-3:]) == "incomplete (interrupted run)"


def test_a_source_removed_during_the_copy_is_named_as_removed(local_set, tmp_path, capsys):
    """`actcache rm` of the source while cp runs: the copy stops saying the set was removed since it was opened,
    not that a shard is missing and the source needs repair."""
    import shutil

    from actcache.errors import Failure

    src = shutil.copytree(local_set, tmp_path / "src" / Path(local_set).name)

    def remove_source(_) -> None:
        if src.exists():
            assert cli.main(["rm", str(src), "--yes"]) == 0

    with pytest.raises(Failure, match=r"was removed since it was opened \(`actcache rm`\?\)"):
        copy_set(str(src), str(tmp_path / "dest"), jobs=1, on_shard=remove_source)


def test_a_destination_that_cannot_be_created_names_the_path_given(local_set, capsys):
    code, _, err = cp(capsys, local_set, "/proc/nope")
    assert code == 2 and "cannot create store '/proc/nope'" in err, err
    assert err.strip().endswith("choose another destination store"), err
