"""ActivationDataset reads a real extracted set back from S3: every token exactly once per epoch."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from actcache.copy import copy_set
from actcache.dataset import ActivationDataset, prefetched
from actcache.errors import ActcacheError
from actcache.reader import open_set

CTX = 32


@pytest.fixture(scope="module")
def sets(tiny_models, corpus, prefect_harness, s3_server, tmp_path_factory):
    """One set of 8 shards (4 sequences of 32 tokens each), on local disk and copied to S3."""
    from actcache.api import extract
    from actcache.config import ExtractConfig

    local = tmp_path_factory.mktemp("dataset-store")
    cfg = ExtractConfig(model=str(tiny_models["gpt2"]), hook="blocks.1.hook_resid_post", dataset=str(corpus),
                        context_size=CTX, max_tokens=1024, shard_tokens=128, batch_size=4, store=str(local),
                        device="cpu")
    url = extract(cfg)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3_server.env("writer").items():
            mp.setenv(k, v)
        s3_url = copy_set(url, s3_server.new_prefix()).url
    return {"local": url, "s3": s3_url}


@pytest.fixture
def s3_url(sets, s3_env):
    return sets["s3"]


def truth(url: str, skip: int = 0) -> list[tuple[bytes, int]]:
    """Every (activation row, token id) of the set in order, read with the plain reader."""
    rows = []
    for shard in open_set(url):
        a = shard.activations[:, skip:].reshape(-1, shard.activations.shape[-1])
        t = shard.tokens[:, skip:].reshape(-1)
        rows += [(a[i].numpy().tobytes(), int(t[i])) for i in range(len(t))]
    return rows


def rows_of(batches) -> list[tuple[bytes, int]]:
    out = []
    for acts, tokens in batches:
        assert acts.ndim == 2 and tokens.shape == (len(acts),)
        out += [(acts[i].numpy().tobytes(), int(tokens[i])) for i in range(len(acts))]
    return out


def test_in_order_without_shuffling(s3_url):
    ds = ActivationDataset(s3_url, batch_size=100, with_tokens=True)
    batches = list(ds)
    assert [len(a) for a, _ in batches] == [100] * 10 + [24]  # 1024 rows, batches span shard boundaries
    assert batches[0][0].dtype == torch.float16 and batches[0][0].shape[1] == ds.d == 32
    assert rows_of(batches) == truth(s3_url)
    assert ds.n_tokens == 1024


def test_shuffled_epoch_has_every_token_once_and_is_reproducible(s3_url):
    ds = ActivationDataset(s3_url, batch_size=64, shuffle_buffer=300, seed=7, with_tokens=True)
    first = rows_of(ds)
    assert Counter(first) == Counter(truth(s3_url))
    assert first != truth(s3_url)
    assert rows_of(ds) == first  # same seed and epoch: same order
    ds.set_epoch(1)
    again = rows_of(ds)
    assert Counter(again) == Counter(first) and again != first


def test_two_dataloader_workers_split_shards(s3_url):
    ds = ActivationDataset(s3_url, batch_size=50, shuffle_buffer=256, seed=1, with_tokens=True)
    loader = DataLoader(ds, batch_size=None, num_workers=2)  # forked workers open their own S3 client
    got = rows_of(loader)
    assert Counter(got) == Counter(truth(s3_url))
    worker_shards = [{r.index for r in ds.shards_for(w, 2)} for w in (0, 1)]
    assert not worker_shards[0] & worker_shards[1] and len(worker_shards[0] | worker_shards[1]) == 8


def test_two_ranks_split_without_overlap(s3_url):
    per_rank = [ActivationDataset(s3_url, batch_size=64, shuffle_buffer=128, seed=3, rank=r, world_size=2,
                                  with_tokens=True) for r in (0, 1)]
    shard_sets = [{r.index for r in ds.shards_for()} for ds in per_rank]
    assert not shard_sets[0] & shard_sets[1] and len(shard_sets[0] | shard_sets[1]) == 8
    got = [rows_of(ds) for ds in per_rank]
    assert Counter(got[0]) + Counter(got[1]) == Counter(truth(s3_url))
    with pytest.raises(ActcacheError, match="rank 2 is outside world_size 2"):
        ActivationDataset(s3_url, batch_size=1, rank=2, world_size=2)


def test_drop_bos_dtype_and_drop_last(s3_url):
    ds = ActivationDataset(s3_url, batch_size=100, drop_bos=True, dtype=torch.float32, drop_last=True)
    batches = list(ds)
    assert all(b.dtype == torch.float32 and b.shape == (100, 32) for b in batches)
    assert len(batches) == (1024 - 32) // 100  # 32 sequences lose their BOS position; the remainder is dropped
    rows = [r.to(torch.float16).numpy().tobytes() for b in batches for r in b]
    assert rows == [a for a, _ in truth(s3_url, skip=1)][: len(rows)]
    assert ActivationDataset(s3_url, batch_size=1, drop_bos=True).n_tokens == 1024 - 32


def test_verify_catches_a_corrupted_shard(sets, tmp_path):
    src = open_set(sets["local"])
    copy = copy_set(sets["local"], str(tmp_path)).url
    path = tmp_path / src.set_id / src.records[2].file
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size: only a checksum notices
    path.write_bytes(bytes(data))
    assert len(list(ActivationDataset(copy, batch_size=4096))) == 1  # unverified: read as is
    with pytest.raises(ActcacheError, match="shard 2 of .* fails its checksum"):
        list(ActivationDataset(copy, batch_size=4096, verify=True))


def test_prefetch_reads_ahead_a_bounded_number_of_items():
    loaded = []
    lock = threading.Lock()
    fourth = threading.Event()

    def load(i):
        with lock:
            loaded.append(i)
            if len(loaded) == 4:
                fourth.set()
        return i

    it = prefetched(load, range(100), depth=2)
    assert next(it) == 0
    # The one consumed, two queued, one loaded and waiting to be queued: the single reader thread cannot load
    # a fifth before a slot frees, so this count is exact once the fourth load has happened (no sleep needed).
    assert fourth.wait(30)
    assert loaded == [0, 1, 2, 3]
    it.close()  # stopping early ends the background thread (close joins it)
    assert loaded == [0, 1, 2, 3]
    assert not [t for t in threading.enumerate() if t.name == "actcache-prefetch"]


def test_prefetch_error_reaches_the_consumer():
    def load(i):
        if i == 3:
            raise ValueError("shard 3 is bad")
        return i

    got = []
    with pytest.raises(ValueError, match="shard 3 is bad"):
        for x in prefetched(load, range(10), depth=2):
            got.append(x)
    assert got == [0, 1, 2]
