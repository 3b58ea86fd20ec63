"""The reader on S3 while a run extends the set it reads (issue 21): a shard read between the run's two writes,
its new bytes and then its new record, is named as the extension it is, not as damage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from setwriter import extract_by_stages

from actcache.errors import Failure
from actcache.format import layout
from actcache.read.reader import open_set
from actcache.sets.copy import copy_set
from actcache.storage.store import DamagedFile, Store


@pytest.fixture
def extension(extracted_set, make_config, tmp_path) -> dict[str, bytes]:
    """Shard 3 and its record as a run that raises --max-tokens from 448 to 512 writes them (2 -> 4 sequences)."""
    store = shutil.copytree(Path(extracted_set).parent, tmp_path / "store")
    url = extract_by_stages(make_config(max_tokens=512, store=str(store)))
    extended = open_set(url).records[3]
    return {
        extended.file: (Path(url) / extended.file).read_bytes(),
        layout.record_file(3): (Path(url) / layout.record_file(3)).read_bytes(),
    }


def test_a_shard_read_before_its_new_record_lands_is_an_extension(
    extracted_set, extension, s3_server, s3_env, monkeypatch
):
    """The run's second write (the record) lands just after the reader looked at the record: the reader used to
    call the shard damaged ("rerun the extraction to repair it") on that one look."""
    url = copy_set(extracted_set, s3_server.new_prefix()).url
    store, set_id = Store(url.rsplit("/", 1)[0]), url.rsplit("/", 1)[1]
    opened = open_set(url)
    shard_file, record_file = extension
    store.write_bytes(f"{set_id}/{shard_file}", extension[shard_file])  # the run's first write
    read_json, landed = opened.store.read_json, []

    def record_lands_after_this_read(rel: str, **kwargs):
        out = read_json(rel, **kwargs)
        if rel == f"{set_id}/{record_file}" and not landed:
            landed.append(store.write_bytes(rel, extension[record_file]))  # the run's second write
        return out

    monkeypatch.setattr(opened.store, "read_json", record_lands_after_this_read)
    with pytest.raises(Failure, match="changed since it was opened: shard 3 was rewritten") as e:
        opened.read(opened.records[3])
    assert landed and "repair" not in str(e.value)


def test_a_shard_whose_new_record_never_comes_is_damage(extracted_set, extension, s3_server, s3_env):
    """A run killed between its two writes: no record follows, and the rerun that repairs the shard is named."""
    url = copy_set(extracted_set, s3_server.new_prefix()).url
    store, set_id = Store(url.rsplit("/", 1)[0]), url.rsplit("/", 1)[1]
    opened = open_set(url)
    shard_file = opened.records[3].file
    store.write_bytes(f"{set_id}/{shard_file}", extension[shard_file])
    with pytest.raises(DamagedFile, match="rerun the extraction to repair it"):
        opened.read(opened.records[3])
