"""Shard size by bytes: the default's sequences per shard from the hooks' widths, the memory check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cliargs import extract_argv

from actcache.cli.app import main
from actcache.config import ExtractConfig
from actcache.errors import ActcacheError
from actcache.extraction import sizing
from actcache.format.shardfile import ShardFile


def _cfg(**kw) -> ExtractConfig:
    return ExtractConfig(**{"context_size": 128, "hook": "blocks.0.hook_resid_post", **kw})


@pytest.mark.parametrize("d,dtype", [(768, "float16"), (4096, "float16"), (8192, "bfloat16"), (1024, "float32")])
def test_default_shards_fill_but_never_pass_the_byte_target(d, dtype):
    cfg = _cfg(dtype=dtype)
    seqs = sizing.seqs_per_shard(cfg, [d])
    f = ShardFile(
        {"activations": (getattr(torch, dtype), (seqs, 128, d)), "tokens": (torch.int32, (seqs, 128))},
        {"set_id": "f" * 24, "hook": cfg.hook, "index": "999999"},
    )
    assert f.size <= cfg.shard_bytes < f.size + sizing.shard_file_bytes(1, 128, d, dtype) + sizing.HEADER_ROOM
    f.release()


def test_wide_models_get_fewer_tokens_and_the_widest_hook_sizes_a_pass():
    narrow, wide = (sizing.seqs_per_shard(_cfg(), [d]) for d in (768, 4096))
    assert narrow > 5 * wide >= 5
    mixed = _cfg(hook="blocks.0.hook_resid_post,blocks.0.mlp.hook_post")
    assert sizing.seqs_per_shard(mixed, [768, 3072]) == sizing.seqs_per_shard(_cfg(), [3072])


def test_shard_tokens_wins():
    assert sizing.seqs_per_shard(_cfg(shard_tokens=1 << 18), [4096]) == 2048


@pytest.mark.usefixtures("prefect_harness")  # `extract` brings Prefect up before the plan checks memory
def test_a_shard_size_that_does_not_fit_is_refused_before_anything_is_written(argv_for, monkeypatch, capsys):
    argv, store = argv_for
    monkeypatch.setattr(sizing, "available_bytes", lambda: 5 << 20)
    code = main([*argv, "--shard-tokens", "32768"])  # 32768 tokens x (32 float16 + 1 int32) = 2.1 MiB
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "--shard-tokens 32768 needs up to 6.4 MiB of host memory for shards (3 x 2.1 MiB" in err[0], err
    assert "5.0 MiB is available; lower --shard-tokens" in err[0], err
    assert not store.exists()


def test_the_estimate_counts_compressed_copies_and_every_hook(monkeypatch):
    monkeypatch.setattr(sizing, "available_bytes", lambda: 1 << 30)
    cfg = _cfg(shard_tokens=1 << 14, codec="zstd")
    sizing.check_memory(cfg, 128, [32])  # 16384 tokens x 68 B = 1.1 MiB, x 5: fits
    # 16384 tokens x (4096 + 10000 float16 + 2 int32) = 440.6 MiB, x 5
    with pytest.raises(ActcacheError, match=r"needs up to 2.2 GiB .*\(5 x 440.6 MiB: .*compressed copies"):
        sizing.check_memory(cfg, 128, [4096, 10_000])


@pytest.fixture
def argv_for(tiny_models, corpus, tmp_path):
    store = tmp_path / "store"
    return extract_argv(tiny_models["gpt2"], corpus, store, max_tokens=65536, shard_tokens=None), Path(store)
