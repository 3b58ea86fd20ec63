"""ActivationDataset reads real sets back (extracted, or written by the real shard encoder), local and on S3.

Fast paths are checked against an obvious loop over every row (``reference``): same rows, each exactly once
per epoch, the same order for the same seed, another order for another epoch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import setwriter
import torch
from readback import Row, full, reference, rows_of
from torch.utils.data import DataLoader

from actcache.errors import ActcacheError
from actcache.format import manifest
from actcache.read import batches, dataset, makers
from actcache.read.dataset import ActivationDataset
from actcache.read.reader import open_set
from actcache.sets.copy import copy_set
from actcache.sets.shuffle import shuffle_set
from actcache.storage.store import Store

CTX = 32


# -- order, epochs, seeds ------------------------------------------------------------------------------
def test_in_order_without_shuffling(s3_url):
    ds = ActivationDataset(s3_url, batch_size=100, with_tokens=True)
    batches = list(ds)
    assert [len(a) for a, _ in batches] == [100] * 10 + [24]  # 1024 rows, batches span shard boundaries
    assert batches[0][0].dtype == torch.float16 and batches[0][0].shape[1] == ds.d == 32
    assert [(a, t) for a, t, _ in rows_of((a, t, torch.zeros_like(t)) for a, t in batches)] == [
        (a, t) for a, t, _ in reference(s3_url)[0]
    ]
    assert ds.n_tokens == 1024 and len(ds) == 11


def test_shuffled_epoch_has_every_row_once_and_is_reproducible(s3_url):
    ds = full(s3_url, batch_size=64, shuffle_buffer=300, seed=7)
    first = rows_of(ds)
    everything = reference(s3_url)[0]
    assert sorted(first) == sorted(everything) and first != everything
    assert rows_of(ds) == first  # same seed and epoch: same order
    ds.set_epoch(1)
    again = rows_of(ds)
    assert sorted(again) == sorted(everything) and again != first
    assert rows_of(full(s3_url, batch_size=64, shuffle_buffer=300, seed=8)) != first


def test_a_batch_is_a_sample_of_the_buffer_not_a_run(local_set):
    """Consecutive rows of a batch are not consecutive positions of the set (which a micro-batching trainer
    would see if a batch were gathered shard by shard)."""
    ds = full(local_set, batch_size=64, shuffle_buffer=512, seed=0)
    positions = torch.cat([p for _, _, p in ds])
    adjacent = (positions[1:] - positions[:-1]).abs().eq(1).float().mean()
    assert adjacent < 0.05


@pytest.mark.parametrize(
    "options",
    [{}, {"drop_bos": True}, {"exclude_special_tokens": True}, {"exclude_tokens": [0, 17], "drop_bos": True}],
    ids=str,
)
def test_fast_path_equals_the_row_by_row_reference(local_set, options):
    special = (0,) if options.get("exclude_special_tokens") else ()  # the tiny tokenizer's BOS = EOS = separator
    exclude = special + tuple(options.get("exclude_tokens", ()))
    for world_size in (1, 3):
        want = reference(local_set, drop_bos=options.get("drop_bos", False), exclude=exclude, world_size=world_size)
        for rank in range(world_size):
            ds = full(local_set, batch_size=50, rank=rank, world_size=world_size, **options)
            assert rows_of(ds) == want[rank], (world_size, rank)
        for rank in range(world_size):  # shuffled: the same rows per epoch, in another order
            ds = full(local_set, batch_size=50, shuffle_buffer=200, rank=rank, world_size=world_size, **options)
            got = rows_of(ds)
            assert len(got) == len(want[rank]) == ds.rows_per_rank
            if world_size == 1:
                assert sorted(got) == sorted(want[0]) and got != want[0]


def shuffled_reference(ds: ActivationDataset, rank_rows: list[Row]) -> list[list[Row]]:
    """The batches of a shuffled epoch (one rank, no DataLoader workers), by an obvious loop: the rank's rows in the
    epoch's shard order fill a list of ``shuffle_buffer`` rows; a full list is permuted by the epoch's generator,
    cut into batches, and the rows short of a batch move to the front of the next fill."""
    by_shard: dict[int, list[Row]] = {}
    s, base = open_set(ds.set.url), 0
    for r, count in zip(s.records, (r.n_tokens for r in s.records), strict=True):
        by_shard[r.index] = [row for row in rank_rows if base <= row[2] < base + count]
        base += count
    pieces = ds.pieces()
    rows = [row for p in pieces for row in by_shard[ds.set.records[p.shard].index][: p.stop - p.start]]
    g = torch.Generator().manual_seed(dataset._seed(ds.seed, ds.epoch, ds.world_size, ds.rank, 0))
    sizes = ds._sizes(len(rows), last=True)
    cap, buf, out = min(max(ds.shuffle_buffer, ds.batch_size), len(rows)), [], []

    def drain(final: bool) -> list[Row]:
        perm, at = torch.randperm(len(buf), generator=g).tolist(), 0
        while sizes and len(buf) - at >= sizes[0]:
            out.append([buf[i] for i in perm[at : at + sizes[0]]])
            at += sizes.pop(0)
        return [] if final else [buf[i] for i in perm[at:]]

    for row in rows:
        buf.append(row)
        if len(buf) == cap:
            buf = drain(final=False)
    if buf:
        drain(final=True)
    return out


@pytest.mark.parametrize("options", [{}, {"exclude_tokens": [0, 17], "drop_bos": True}], ids=str)
@pytest.mark.parametrize("batch_size, shuffle_buffer", [(50, 200), (64, 256), (100, 100), (30, 1024)])
def test_shuffled_batches_equal_the_reference_in_every_dtype(local_set, options, batch_size, shuffle_buffer):
    """float16 batches (the stored dtype: rows go straight from the shard into the batch) and float32 ones (cast
    into a buffer first) are the reference's rows in the reference's batches, for the same seed and epoch."""
    exclude = tuple(options.get("exclude_tokens", ()))
    want_rows = reference(local_set, drop_bos=options.get("drop_bos", False), exclude=exclude)[0]
    for epoch in (0, 1):
        ds = full(local_set, batch_size=batch_size, shuffle_buffer=shuffle_buffer, seed=5, **options)
        ds.set_epoch(epoch)
        want = shuffled_reference(ds, want_rows)
        assert ds.dtype == torch.float16 and sum(map(len, want)) == ds.rows_per_rank
        half = list(ds)
        assert [rows_of([b]) for b in half] == want
        wide = full(
            local_set, batch_size=batch_size, shuffle_buffer=shuffle_buffer, seed=5, dtype=torch.float32, **options
        )
        wide.set_epoch(epoch)
        for (a32, t32, p32), (a16, t16, p16) in zip(wide, half, strict=True):
            assert a32.dtype == torch.float32 and torch.equal(a32, a16.float())
            assert torch.equal(t32, t16) and torch.equal(p32, p16)


def test_a_shuffle_buffer_in_huge_pages_holds_the_same_rows(local_set, monkeypatch):
    """A buffer asked for in huge pages (an anonymous mapping, as large buffers get) yields the batches of one in
    torch's memory, cast and normalised the same, epoch after epoch (the mapping is kept for the next one)."""

    def epochs(ds):
        out = []
        for epoch in (0, 1):
            ds.set_epoch(epoch)
            out.append(list(ds))
        return out

    options = dict(batch_size=50, shuffle_buffer=200, seed=3, dtype=torch.float32, normalize="scale")
    plain = epochs(full(local_set, exclude_tokens=[0], **options))
    monkeypatch.setattr(batches, "HUGE_MIN", 0)
    ds = full(local_set, exclude_tokens=[0], **options)
    mapped = epochs(ds)
    assert ds._spare["acts"].untyped_storage().data_ptr() % 4096 == 0  # a mapping of its own, page-aligned
    assert len(mapped) == len(plain) and all(len(a) == len(b) for a, b in zip(mapped, plain, strict=True))
    for a, b in zip(sum(mapped, []), sum(plain, []), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "stored, options",
    [
        ("float16", {}),
        ("float16", {"exclude_tokens": [0, 1], "drop_bos": True, "dtype": torch.float32, "normalize": "scale"}),
        ("float32", {"dtype": torch.float16}),  # cast at the fill: batches narrower than the stored rows
        ("float32", {"dtype": torch.bfloat16, "exclude_special_tokens": True, "normalize": "standardize"}),  # staged
    ],
    ids=str,
)
def test_threads_share_the_fill_and_make_the_same_batches(tmp_path, monkeypatch, stored, options):
    """However many threads fill the buffer and make the batches, an epoch is the same batches, byte for byte
    (each thread copies its own rows of each piece, and stages casts in its own rows)."""
    url = setwriter.write_set(
        tmp_path, shards=5, seqs=4, ctx=16, d=24, dtype=stored, last_seqs=3, with_stats=True, with_moments=True
    )
    opts = dict(batch_size=20, shuffle_buffer=90, seed=2, with_tokens=True, with_positions=True, **options)
    one = list(ActivationDataset(url, threads=1, **opts))
    monkeypatch.setattr(batches, "FILL_SPLIT_MIN", 1)  # split every fill, however small the rows
    monkeypatch.setattr(batches, "FILL_SHARED_FROM", 2)
    split = []
    share = makers.Makers.all
    monkeypatch.setattr(makers.Makers, "all", lambda team, do, jobs: (split.append(len(jobs)), share(team, do, jobs)))
    for n in (2, 3, 5):
        split.clear()
        got = list(ActivationDataset(url, threads=n, **opts))
        assert split and max(split) == n, split
        assert len(got) == len(one)
        for a, b in zip(got, one, strict=True):
            assert all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "stored, options",
    [
        ("float16", {}),
        ("float16", {"exclude_tokens": [0, 1], "drop_bos": True, "dtype": torch.float32, "normalize": "scale"}),
        ("float32", {"dtype": torch.bfloat16, "exclude_special_tokens": True, "normalize": "standardize"}),
    ],
    ids=str,
)
def test_in_order_batches_made_by_several_threads_are_the_same(tmp_path, stored, options):
    """In order, each maker casts and copies whole batches, some spanning two pieces, some from pieces with excluded
    rows (staged in the maker's own memory): the same batches, in the same order, for any count, and each row
    where the set stores it."""
    url = setwriter.write_set(
        tmp_path, shards=5, seqs=4, ctx=16, d=24, dtype=stored, last_seqs=3, with_stats=True, with_moments=True
    )
    opts = dict(batch_size=23, with_tokens=True, with_positions=True, **options)  # 23: batches span pieces
    one = list(ActivationDataset(url, threads=1, **opts))
    assert torch.equal(torch.cat([b[2] for b in one]), torch.sort(torch.cat([b[2] for b in one])).values)
    for n in (2, 3, 5):
        got = list(ActivationDataset(url, threads=n, **opts))
        assert len(got) == len(one)
        for a, b in zip(got, one, strict=True):
            assert all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_shuffled_rows_of_any_width_in_the_stored_dtype(tmp_path):
    """Rows whose bytes are not a multiple of 8 (copied element by element) and bfloat16 rows."""
    for d, dtype in ((6, "float16"), (3, "bfloat16"), (8, "bfloat16")):
        url = setwriter.write_set(tmp_path / f"{d}-{dtype}", shards=3, seqs=4, ctx=16, d=d, dtype=dtype)
        ds = full(url, batch_size=20, shuffle_buffer=70, seed=1)
        got = list(ds)
        assert got[0][0].dtype == ds.set.dtype and got[0][0].shape == (20, d)
        assert [rows_of([b]) for b in got] == shuffled_reference(ds, reference(url)[0])


# -- ranks and workers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 7, 8, 9, 20])
def test_every_rank_gets_the_same_batches_and_no_row_twice(local_set, world_size):
    """8 shards of 128 rows: world sizes below, at and above the shard count; remainders are left out."""
    everything = reference(local_set)[0]
    per_rank = [
        rows_of(full(local_set, batch_size=24, shuffle_buffer=100, seed=2, rank=r, world_size=world_size))
        for r in range(world_size)
    ]
    ds = full(local_set, batch_size=24, rank=0, world_size=world_size)
    assert {len(rows) for rows in per_rank} == {1024 // world_size} == {ds.rows_per_rank}
    batches = [len(list(full(local_set, batch_size=24, rank=r, world_size=world_size))) for r in range(world_size)]
    assert set(batches) == {len(ds)} == {-(-(1024 // world_size) // 24)}
    seen = [row for rows in per_rank for row in rows]
    assert len(set(seen)) == len(seen) and set(seen) <= set(everything)
    assert len(everything) - len(seen) == 1024 % world_size


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_dataloader_workers_read_the_same_rows_in_the_same_batches(local_set, num_workers):
    ds = full(local_set, batch_size=50, shuffle_buffer=256, seed=1, rank=1, world_size=3)
    loader = DataLoader(ds, batch_size=None, num_workers=num_workers)
    batches = list(loader)
    assert len(batches) == len(ds) == len(loader) == 7  # 341 rows: 6 of 50 and one of 41, whatever the workers
    assert sorted(len(b[0]) for b in batches) == [41] + [50] * 6
    alone = full(local_set, batch_size=50, shuffle_buffer=256, seed=1, rank=1, world_size=3)
    assert sorted(rows_of(batches)) == sorted(rows_of(alone))


def test_set_epoch_reaches_persistent_workers(local_set):
    ds = full(local_set, batch_size=64, shuffle_buffer=256, seed=3)
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    epochs = []
    for epoch in (0, 1, 0):
        ds.set_epoch(epoch)
        epochs.append(rows_of(loader))
    assert epochs[0] != epochs[1] and sorted(epochs[0]) == sorted(epochs[1])
    assert epochs[2] == epochs[0]
    assert epochs[0] == rows_of(
        DataLoader(full(local_set, batch_size=64, shuffle_buffer=256, seed=3), batch_size=None, num_workers=2)
    )


def test_s3_workers_and_ranks(s3_url):
    per_rank = [
        rows_of(
            DataLoader(
                full(s3_url, batch_size=50, shuffle_buffer=256, seed=1, rank=r, world_size=2),
                batch_size=None,
                num_workers=2,
            )
        )
        for r in (0, 1)
    ]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(reference(s3_url)[0])
    with pytest.raises(ActcacheError, match="rank 2 is outside world_size 2"):
        ActivationDataset(s3_url, batch_size=1, rank=2, world_size=2)


# -- exclusions ----------------------------------------------------------------------------------------
def test_special_tokens_are_excluded_and_counted(local_set):
    s = open_set(local_set)
    tokens = torch.cat([sh.tokens.reshape(-1) for sh in s])
    ds = full(local_set, batch_size=100, shuffle_buffer=300, exclude_special_tokens=True)
    assert ds.exclude == (0,) and ds.excluded == {0: int((tokens == 0).sum())} and ds.excluded[0] > 32
    got = rows_of(ds)
    assert len(got) == ds.n_tokens == 1024 - ds.excluded[0] and not {t for _, t, _ in got} & {0}
    for _, token, position in got:  # positions still say where each row was
        assert token == int(tokens[position])
    both = full(local_set, batch_size=100, drop_bos=True, exclude_tokens=[0])
    assert both.excluded[0] == ds.excluded[0] - 32  # BOS positions are drop_bos's, not counted per id
    assert ActivationDataset(local_set, batch_size=1, drop_bos=True).n_tokens == 1024 - 32


def test_old_manifest_excludes_what_it_records_and_says_so(tmp_path):
    url = setwriter.write_set(tmp_path, shards=2, seqs=16, ctx=16, d=4, recorded=())
    with pytest.warns(UserWarning, match="predates recording eos_id and pad_id.*BOS and separator ids it records"):
        ds = ActivationDataset(url, batch_size=8, exclude_special_tokens=True, with_tokens=True)
    assert ds.exclude == (setwriter.BOS, setwriter.EOS)
    tokens = torch.cat([t for _, t in ds])
    pads = sum(int((s.tokens == setwriter.PAD).sum()) for s in open_set(url))
    assert pads and int((tokens == setwriter.PAD).sum()) == pads
    # no recorded vocabulary: only negative ids can be refused
    assert ActivationDataset(url, batch_size=8, exclude_tokens=[10**6]).excluded == {10**6: 0}


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            [512],
            r"token id 512 is outside the vocabulary of this set's tokenizer "
            r"\(0\.\.511\); fix exclude_tokens",
        ),
        ([-1], "token id -1 is outside the vocabulary"),
        (["eos"], "exclude_tokens takes integer token ids"),
        ([True], "exclude_tokens takes integer token ids"),
    ],
)
def test_exclusion_ids_are_checked(synthetic, bad, message):
    with pytest.raises(ActcacheError, match=message) as e:
        ActivationDataset(synthetic, batch_size=8, exclude_tokens=bad)
    assert "\n" not in str(e.value)
    assert ActivationDataset(synthetic, batch_size=8, exclude_tokens=[511]).exclude == (511,)


# -- the rows layout ------------------------------------------------------------------------------------
def test_rows_layout_reads_in_its_order_and_keeps_positions(local_set, tmp_path):
    rows_url = shuffle_set(local_set, out=str(tmp_path), seed=5, rows_per_shard=300).url
    s = open_set(rows_url)
    assert s.layout == "rows" and [r.n_tokens for r in s.records] == [300, 300, 300, 124]
    shard = s.read(s.records[0])
    assert shard.activations.shape == (300, 32) and shard.tokens.shape == (300,)
    assert shard.positions.dtype == torch.int64
    source = {p: (a, t) for a, t, p in reference(local_set)[0]}
    got = rows_of(full(rows_url, batch_size=100))  # sequential: the stored (shuffled) order
    stored = torch.cat([x.positions for x in s]).tolist()
    assert [p for _, _, p in got] == stored and sorted(stored) == list(range(1024)) and stored != sorted(stored)
    assert all(source[p] == (a, t) for a, t, p in got)
    no_bos = rows_of(full(rows_url, batch_size=100, drop_bos=True, shuffle_buffer=128))
    assert sorted(p for _, _, p in no_bos) == [p for p in range(1024) if p % CTX]
    ds = full(rows_url, batch_size=100, exclude_special_tokens=True, world_size=3, rank=2)
    assert ds.excluded == full(local_set, batch_size=100, exclude_special_tokens=True).excluded
    assert all(t != 0 for _, t, _ in rows_of(ds)) and len(rows_of(ds)) == ds.rows_per_rank


def test_an_unknown_layout_is_refused(local_set, tmp_path):
    url = setwriter.write_set(tmp_path, shards=1, seqs=1, ctx=4, d=2)
    path = Path(url) / "manifest.json"
    m = json.loads(path.read_text())
    manifest.write(Store(str(tmp_path)), Path(url).name, {**m, "layout": "columns"})  # sealed
    with pytest.raises(ActcacheError, match="has layout 'columns', which this actcache cannot read"):
        ActivationDataset(url, batch_size=8)


# -- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, message",
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"shuffle_buffer": -1}, "shuffle_buffer must be 0"),
        ({"prefetch": 0}, "prefetch must be at least 1"),
        ({"threads": 0}, "threads must be a positive number of threads"),
        ({"threads": 2.0}, "threads must be a positive number of threads"),
        ({"dtype": torch.int32}, "dtype must be a torch floating dtype"),
        ({"normalize": "unit"}, "normalize must be one of scale, standardize"),
        ({"device": "tpu:x"}, "device must be 'cpu', 'cuda' or 'cuda:N'"),
        ({"rank": 0, "world_size": 0}, "rank 0 is outside world_size 0"),
    ],
)
def test_bad_options_are_one_line(synthetic, options, message):
    with pytest.raises(ActcacheError, match=message) as e:
        ActivationDataset(synthetic, **{"batch_size": 8, **options})
    assert "\n" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_options_need_cuda(synthetic):
    with pytest.raises(ActcacheError, match="pin_memory=True needs a CUDA device"):
        ActivationDataset(synthetic, batch_size=8, pin_memory=True)
    with pytest.raises(ActcacheError, match="torch sees no CUDA device"):
        ActivationDataset(synthetic, batch_size=8, device="cuda")


def test_unknown_and_newer_sets_are_refused(synthetic, tmp_path):
    with pytest.raises(ActcacheError, match="no activation set at"):
        ActivationDataset(str(tmp_path / ("0" * 24)), batch_size=8)
    url = setwriter.write_set(tmp_path, shards=1, seqs=1, ctx=4, d=2, seed=9)
    path = Path(url) / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 99}))
    with pytest.raises(ActcacheError, match="has format version 99, newer than this actcache reads"):
        ActivationDataset(url, batch_size=8)


def test_verify_catches_a_corrupted_shard(local_set, tmp_path):
    src = open_set(local_set)
    copy = copy_set(local_set, str(tmp_path)).url
    path = tmp_path / src.set_id / src.records[2].file
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size: only a checksum notices
    path.write_bytes(bytes(data))
    assert len(list(ActivationDataset(copy, batch_size=4096))) == 1  # unverified: read as is
    with pytest.raises(ActcacheError, match="shard 2 of .* fails its checksum"):
        list(ActivationDataset(copy, batch_size=4096, verify=True))


def test_a_batch_counts_exactly_what_the_dataloader_expects(local_set):
    """``len`` matches what a DataLoader yields, so it never warns about an IterableDataset's length."""
    ds = full(local_set, batch_size=100, drop_last=True, world_size=3, rank=0)
    assert len(ds) == len(list(DataLoader(ds, batch_size=None, num_workers=2))) == 341 // 100
    assert Counter(len(b[0]) for b in ds) == {100: 3}


# A program that stops reading before an epoch ends, then exits: it must print nothing at exit (the reader's
# clean-up used to run after concurrent.futures was torn down and printed an ignored AttributeError).
PARTIAL_EPOCH = """
import sys
import torch
from torch.utils.data import DataLoader
import actcache

if __name__ == "__main__":
    url, workers, buffer, how = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    ds = actcache.ActivationDataset(url, batch_size=8, shuffle_buffer=buffer, drop_bos=True, dtype=torch.float32,
                                    device="cpu" if how == "device" else None, prefetch=1)
    src = DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0) if workers else ds
    if how == "break":
        it = iter(src)
        for batch in it:
            break
    else:  # forever (the README's loop) and device: a few steps of an endless stream
        batches = actcache.forever(src)
        for step in range(3):
            x = next(batches)
"""


@pytest.mark.parametrize(
    ("workers", "buffer", "how"),
    [(0, 0, "forever"), (0, 64, "forever"), (0, 64, "break"), (0, 64, "device"), (2, 64, "forever"), (2, 0, "break")],
)
@pytest.mark.subprocess
def test_a_partial_epoch_exits_silently(synthetic, workers, buffer, how):
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PARTIAL_EPOCH), synthetic, str(workers), str(buffer), how],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr == "" and run.stdout == ""
