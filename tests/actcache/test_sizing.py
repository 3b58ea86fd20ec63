"""Shard size by bytes: hook widths from the config alone, the default's sequences per shard, the memory check."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from actcache import sizing
from actcache.cli import main
from actcache.config import ExtractConfig
from actcache.errors import ActcacheError
from actcache.model import ModelSpec, load_bridge, resolve_model
from actcache.shardfile import ShardFile

NOT_PER_TOKEN = ("hook_attn_scores", "hook_pattern", "hook_cos", "hook_sin", "embed.hook_in")


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_width_from_the_config_is_what_every_hook_gives(tiny_models, arch):
    """Every per-token hook the bridge offers, on models with MLP width != hidden and (llama) fewer k/v heads."""
    model = resolve_model(ModelSpec(str(tiny_models[arch])))
    with torch.inference_mode():
        _, cache = load_bridge(model).run_with_cache(torch.zeros(1, 4, dtype=torch.long))
    checked = 0
    for hook, act in cache.items():
        if hook.endswith(NOT_PER_TOKEN):
            continue
        assert sizing.hook_width(hook, model.config) == math.prod(act.shape[2:]), hook
        checked += 1
    assert checked > 40


def test_grouped_query_attention_widths():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=8192, num_attention_heads=64, num_key_value_heads=8, intermediate_size=28672)
    widths = {h: sizing.hook_width(f"blocks.40.{h}", cfg) for h in
              ("hook_resid_post", "attn.hook_z", "attn.hook_k", "mlp.hook_post", "ln1.hook_scale")}
    assert widths == {"hook_resid_post": 8192, "attn.hook_z": 8192, "attn.hook_k": 1024, "mlp.hook_post": 28672,
                      "ln1.hook_scale": 1}


def _cfg(**kw) -> ExtractConfig:
    return ExtractConfig(**{"context_size": 128, "hook": "blocks.0.hook_resid_post", **kw})


def _model_config(d: int, d_mlp: int | None = None):
    from transformers import GPT2Config

    return GPT2Config(n_embd=d, n_head=max(1, d // 64), n_inner=d_mlp)


@pytest.mark.parametrize("d,dtype", [(768, "float16"), (4096, "float16"), (8192, "bfloat16"), (1024, "float32")])
def test_default_shards_fill_but_never_pass_the_byte_target(d, dtype):
    cfg = _cfg(dtype=dtype)
    seqs = sizing.seqs_per_shard(cfg, _model_config(d))
    f = ShardFile({"activations": (getattr(torch, dtype), (seqs, 128, d)), "tokens": (torch.int32, (seqs, 128))},
                  {"set_id": "f" * 24, "hook": cfg.hook, "index": "999999"})
    assert f.size <= cfg.shard_bytes < f.size + sizing.shard_file_bytes(1, 128, d, dtype) + sizing.HEADER_ROOM
    f.release()


def test_wide_models_get_fewer_tokens_and_the_widest_hook_sizes_a_pass():
    narrow, wide = (sizing.seqs_per_shard(_cfg(), _model_config(d)) for d in (768, 4096))
    assert narrow > 5 * wide >= 5
    mixed = _cfg(hook="blocks.0.hook_resid_post,blocks.0.mlp.hook_post")
    assert sizing.seqs_per_shard(mixed, _model_config(768)) == sizing.seqs_per_shard(_cfg(), _model_config(3072))


def test_shard_tokens_wins():
    assert sizing.seqs_per_shard(_cfg(shard_tokens=1 << 18), _model_config(4096)) == 2048


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
    return ["extract", "--model", str(tiny_models["gpt2"]), "--dataset", str(corpus), "--store", str(store),
            "--context-size", "32", "--max-tokens", "65536", "--device", "cpu"], Path(store)
