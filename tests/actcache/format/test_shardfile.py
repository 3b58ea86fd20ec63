"""The shard file built in one buffer is byte for byte what the reference encoder writes."""

from __future__ import annotations

import hashlib

import pytest
import torch

from actcache.format import shard, shardfile

SHAPES = [(1, 1, 1), (3, 5, 7), (2, 3, 1), (4, 32, 33), (5, 17, 64), (1, 2, 1025), (3, 64, 999)]  # the last > 128 KB:
# zstd splits blocks with look-ahead there, which only a one-shot compression of the whole file reproduces
CODECS = [("none", 0), ("zstd", 1), ("zstd", 3), ("shuffle-zstd", 1), ("shuffle-zstd", 3)]


def _tensors(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "activations": (torch.randn(*shape, generator=g) * 4).to(dtype),
        "tokens": torch.randint(0, 50_000, shape[:2], generator=g, dtype=torch.int32),
    }


def _filled(tensors, metadata):
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    f = shardfile.ShardFile(specs, metadata)
    for k, v in tensors.items():
        f.tensors[k].copy_(v)
    return f


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("codec,level", CODECS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_same_bytes_as_the_reference_encoder(dtype, codec, level, shape):
    tensors = _tensors(shape, dtype)
    meta = {"set_id": "0f" * 12, "hook": "blocks.0.hook_resid_post", "index": str(shape[0] * 7)}
    want = shard.encode(tensors, codec=codec, level=level, metadata=meta)
    got = shardfile.encode(_filled(tensors, meta), codec=codec, level=level)
    assert bytes(got.data) == want.data
    assert (got.sha256, got.raw_bytes) == (want.sha256, want.raw_bytes)
    got.release()


@pytest.mark.parametrize("metadata", [None, {"hook": 'a "quoted" \\ hook é\n\t\x01', "index": "12345678901"}])
def test_header_matches_for_any_metadata_text(metadata):
    tensors = _tensors((2, 3, 4), torch.float16)
    assert bytes(_filled(tensors, metadata).view()) == shard.encode(tensors, metadata=metadata).data


def test_large_shuffle_crosses_chunks(monkeypatch):
    """More than one shuffle chunk, and an odd number of rows in the last one."""
    monkeypatch.setattr(shardfile, "SHUFFLE_CHUNK_BYTES", 4096 + 6)
    tensors = _tensors((3, 11, 257), torch.bfloat16, seed=3)
    want = shard.encode(tensors, codec="shuffle-zstd", level=1)
    assert bytes(shardfile.encode(_filled(tensors, None), codec="shuffle-zstd", level=1).data) == want.data


def test_views_are_the_file_and_release_lets_go():
    tensors = _tensors((2, 4, 8), torch.float16)
    f = _filled(tensors, None)
    out = shard.decode(bytes(f.view()), codec="none")
    assert all(torch.equal(out[k], v) for k, v in tensors.items())
    payload = shardfile.encode(f, codec="none")
    assert payload.sha256 == hashlib.sha256(f.view()).hexdigest()
    payload.release()
    assert f.buffer is None and f.tensors == {}
    with pytest.raises(RuntimeError, match="released"):
        f.view()


def test_pinned_buffers_are_reused_and_pageable_ones_are_not(monkeypatch):
    pool = shardfile._Pool()
    made = []

    def empty(n, dtype, pin_memory):  # pinned memory needs CUDA: count allocations instead
        made.append((n, pin_memory))
        return torch.zeros(n, dtype=dtype)

    monkeypatch.setattr(shardfile.torch, "empty", empty)
    a = pool.take(100, pinned=True)
    pool.give(a, pinned=True)
    assert pool.take(80, pinned=True) is a  # a smaller shard (the last one) fits in it
    pool.give(a, pinned=True)
    b = pool.take(200, pinned=True)  # too small now: a new one, and the old one is let go
    assert b is not a and pool.idle == []
    c = pool.take(100, pinned=False)
    pool.give(c, pinned=False)
    assert pool.idle == [] and made == [(100, True), (200, True), (100, False)]
