"""open_set reads both layouts without copying, and a shard's token ids without its activations."""

from __future__ import annotations

import pytest
import setwriter
import torch

from actcache.format import shard
from actcache.read.reader import open_set
from actcache.sets.shuffle import shuffle_set


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    plain = setwriter.write_set(root, shards=3, seqs=4, ctx=8, d=6, last_seqs=1)
    return {
        "plain": plain,
        "zstd": setwriter.write_set(root, shards=3, seqs=4, ctx=8, d=6, last_seqs=1, codec="shuffle-zstd", level=1),
        "rows": shuffle_set(plain, seed=1, rows_per_shard=30).url,
    }


@pytest.mark.parametrize("name", ["plain", "zstd", "rows"])
def test_read_tokens_equals_the_whole_shard_and_reads_only_its_bytes(sets, name, monkeypatch):
    s = open_set(sets[name])
    whole = [s.read(r) for r in s.records]
    asked = []
    read_range, read_mapped = s.store.read_range, s.store.read_mapped
    monkeypatch.setattr(
        s.store, "read_range", lambda rel, start, end: asked.append((start, end)) or read_range(rel, start, end)
    )
    monkeypatch.setattr(
        s.store, "read_mapped", lambda rel, size=None: asked.append("whole") or read_mapped(rel, size=size)
    )
    for r, w in zip(s.records, whole, strict=True):
        tokens, positions = s.read_tokens(r)
        assert torch.equal(tokens, w.tokens.reshape(-1))
        assert (positions is None) == (name != "rows") and (positions is None or torch.equal(positions, w.positions))
    if name == "zstd":
        assert asked == ["whole"] * len(s.records)  # compressed: read whole
    else:  # per shard the header (its first 64 KB), then only the token (and position) bytes
        per_shard = 3 if name == "rows" else 2
        assert len(asked) == per_shard * len(s.records) and "whole" not in asked
        heads, ranges = asked[::per_shard], [a for i, a in enumerate(asked) if i % per_shard]
        assert all(start == 0 and end <= 1 << 16 for start, end in heads)
        assert all(
            0 < end - start <= 8 * r.n_tokens
            for (start, end), r in zip(ranges, [r for r in s.records for _ in range(per_shard - 1)], strict=True)
        )


def test_shards_are_views_of_the_file_and_writes_stay_private(sets):
    s = open_set(sets["plain"])
    a = s.read(s.records[0]).activations
    before = s.store.path(f"{s.set_id}/{s.records[0].file}")
    data = open(before, "rb").read()
    a.zero_()  # a copy-on-write mapping: the file keeps its bytes
    assert open(before, "rb").read() == data
    assert torch.equal(open_set(sets["plain"]).read(s.records[0]).activations, shard.views(data)["activations"])


def test_rows_layout_shapes(sets):
    s = open_set(sets["rows"])
    assert s.layout == "rows" and s.context_size == 8 and s.n_tokens == 2 * 4 * 8 + 8
    x = s.read(s.records[-1])
    assert x.activations.shape == (s.records[-1].n_tokens, 6) and x.positions.shape == x.tokens.shape
