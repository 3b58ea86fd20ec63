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


def test_a_set_extended_after_it_was_opened_is_named_as_such_not_as_damaged(
    extracted_set, tiny_models, corpus, tmp_path
):
    """--max-tokens raised while a reader holds the set: its last shard grows. The reader says the set changed
    since it was opened (reopen it), and reopened, the set reads whole."""
    import shutil
    from pathlib import Path

    from setwriter import extract_by_stages

    from actcache.config import ExtractConfig
    from actcache.errors import Failure

    store = shutil.copytree(Path(extracted_set).parent, tmp_path / "store")
    url = f"{store}/{Path(extracted_set).name}"
    opened = open_set(url)
    last = opened.records[-1]
    assert last.n_seq == 2
    config = ExtractConfig(
        model=str(tiny_models["gpt2"]),
        hook="blocks.1.hook_resid_post",
        dataset=str(corpus),
        context_size=32,
        max_tokens=512,  # the extracted set's 448, raised: shard 3 grows from 2 to 4 sequences
        shard_tokens=128,
        batch_size=4,
        store=str(store),
        device="cpu",
    )
    assert extract_by_stages(config) == url
    assert opened.read(opened.records[0]).activations.shape[0] == 4  # untouched shards read as before
    with pytest.raises(Failure, match="changed since it was opened: shard 3 was rewritten") as e:
        opened.read(last)
    assert "damaged" not in str(e.value) and "repair" not in str(e.value)
    again = open_set(url)
    assert again.read(again.records[-1]).activations.shape[0] == 4


def test_a_set_removed_after_it_was_opened_is_named_as_such_not_as_damaged(extracted_set, tmp_path, capsys):
    """`actcache rm` while a reader (a trainer, export, shuffle) holds the set: the reader says the set was removed
    since it was opened, not that a shard is missing and the extraction should be rerun to repair it."""
    import shutil
    from pathlib import Path

    from actcache.cli import app as cli
    from actcache.errors import Failure
    from actcache.read.dataset import ActivationDataset

    store = shutil.copytree(Path(extracted_set).parent, tmp_path / "store")
    url = f"{store}/{Path(extracted_set).name}"
    opened, ds = open_set(url), iter(ActivationDataset(url, batch_size=8))
    next(ds)
    assert cli.main(["rm", url, "--yes"]) == 0
    capsys.readouterr()
    for read in (lambda: opened.read(opened.records[1]), lambda: list(ds)):
        with pytest.raises(Failure, match=r"was removed since it was opened \(`actcache rm`\?\)"):
            read()


def test_a_target_of_10_to_the_18_tokens_is_counted_not_enumerated(extracted_set, tmp_path):
    """A manifest's target_tokens is whatever its writer put: verify listed every missing index (10^16 of them:
    it ran without end, gigabytes growing). It counts them, and lists the first few."""
    import json
    import shutil
    from pathlib import Path

    from actcache.format import layout, records

    store = shutil.copytree(Path(extracted_set).parent, tmp_path / "store")
    set_dir = store / Path(extracted_set).name
    m = json.loads((set_dir / layout.MANIFEST).read_text())
    m.update(target_tokens=10**18, complete=False)
    (set_dir / layout.MANIFEST).write_text(json.dumps(records.sealed(m)))
    s = open_set(str(set_dir))
    n = len(s.records)
    assert s.n_missing() == s.n_target_shards - n > 10**15
    assert s.missing()[:2] == [n, n + 1] and len(s.missing()) == 10_000
    (problem,) = s.verify()
    assert problem.startswith(f"incomplete: {s.n_target_shards - n} of {s.n_target_shards} shards missing (indices ")
