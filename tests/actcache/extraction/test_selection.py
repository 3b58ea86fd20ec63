"""--heads and --dims on packed sequences (--packing concat): only the kept part is computed into the shards."""

from __future__ import annotations

import torch

from actcache.config import ExtractConfig
from actcache.extraction.stages import run_sequential
from actcache.read.dataset import ActivationDataset
from actcache.read.reader import open_set


def _cfg(model, corpus, store, **changes) -> ExtractConfig:
    base = dict(
        model=str(model), dataset=str(corpus), store=str(store), device="cpu", context_size=32,
        max_tokens=32 * 10, shard_tokens=32 * 4, batch_size=3, dtype="float32",
    )  # fmt: skip
    return ExtractConfig(**{**base, **changes})


def _all(url: str) -> tuple[torch.Tensor, torch.Tensor]:
    s = open_set(url)
    return torch.cat([sh.activations for sh in s]), torch.cat([sh.tokens for sh in s])


def test_heads_and_dims_of_packed_sequences_equal_the_unfiltered_set(tiny_models, corpus, tmp_path):
    hook = "blocks.1.attn.hook_z"
    whole_cfg = _cfg(tiny_models["llama"], corpus, tmp_path / "s", hook=hook)
    (whole,) = run_sequential(whole_cfg)
    (kept,) = run_sequential(_cfg(tiny_models["llama"], corpus, tmp_path / "s", hook=hook, heads="2,0", dims="1,-1"))
    assert kept != whole  # the selection is part of the key; the whole hook's id is that of any packed set
    full, tokens = _all(whole)
    got, got_tokens = _all(kept)
    n_heads, d_head = open_set(whole).manifest["hook_shape"]
    want = full.reshape(*full.shape[:2], n_heads, d_head)[:, :, [2, 0]][..., [1, d_head - 1]].reshape(
        *full.shape[:2], 4
    )
    assert torch.equal(got_tokens, tokens) and torch.equal(got, want)  # the same forward pass, its kept part
    m = open_set(kept).manifest
    assert m["hook_shape"] == [2, 2] and m["d"] == 4
    assert m["selection"] == {"full_hook_shape": [n_heads, d_head], "heads": [2, 0], "dims": [1, d_head - 1]}
    assert "selection" not in open_set(whole).manifest
    assert sum(r["bytes"] for r in m["shards"]) < sum(r["bytes"] for r in open_set(whole).manifest["shards"])
    batch = next(iter(ActivationDataset(kept, batch_size=64)))
    assert batch.shape == (64, 4) and torch.equal(batch, want.reshape(-1, 4)[:64])
    assert run_sequential(_cfg(tiny_models["llama"], corpus, tmp_path / "s", hook=hook, heads="2,0", dims="1,-1")) == [
        kept
    ]  # complete: found again by its key


def test_dims_of_the_residual_stream_on_the_fast_engine(tiny_models, corpus, tmp_path):
    (whole,) = run_sequential(_cfg(tiny_models["gpt2"], corpus, tmp_path / "s", hook="blocks.1.hook_resid_post"))
    (kept,) = run_sequential(
        _cfg(tiny_models["gpt2"], corpus, tmp_path / "s", hook="blocks.1.hook_resid_post", dims="-3:,5")
    )
    full, _ = _all(whole)
    got, _ = _all(kept)
    assert torch.equal(got, full[..., [29, 30, 31, 5]])


def test_heads_of_each_heads_output_a_hook_transformer_lens_keeps_off(tiny_models, corpus, tmp_path):
    """attn.hook_result (each head's part of the attention output, [n_heads, d_model]) is off in TransformerLens 4
    until use_attn_result is set: extraction opens it for its own pass; --heads keeps some heads of it, and the
    heads add up, with the output bias, to the hook_attn_out set extracted beside them (to float32 rounding:
    hook_attn_out comes from the plain pass, which sums the heads in another order)."""
    hook = "blocks.1.attn.hook_result"
    whole, attn_out = run_sequential(
        _cfg(tiny_models["gpt2"], corpus, tmp_path / "s", hook=f"{hook},blocks.1.hook_attn_out")
    )
    (kept,) = run_sequential(_cfg(tiny_models["gpt2"], corpus, tmp_path / "s", hook=hook, heads="3,1"))
    full, tokens = _all(whole)
    n_heads, d = open_set(whole).manifest["hook_shape"]
    per_head = full.reshape(*full.shape[:2], n_heads, d)
    got, got_tokens = _all(kept)
    assert torch.equal(got_tokens, tokens) and torch.equal(got, per_head[:, :, [3, 1]].reshape(*full.shape[:2], -1))
    from actcache.inputs.model import ModelSpec, load_bridge, resolve_model

    b_o = load_bridge(resolve_model(ModelSpec(str(tiny_models["gpt2"])))).blocks[1].attn.b_O
    out, _ = _all(attn_out)
    torch.testing.assert_close(per_head.sum(-2) + b_o, out, rtol=1e-5, atol=1e-6)
