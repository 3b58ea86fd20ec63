"""The Python API end to end: what `open_set` reads back is what the model computes."""

from __future__ import annotations

import pytest
import torch

import actcache
from actcache.model import ModelSpec, load_bridge, resolve_model

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_extract_then_open_set_equals_a_direct_forward_pass(base_config, tiny_models):
    url = actcache.extract(base_config, hook="blocks.2.hook_mlp_out", dtype="float32")
    s = actcache.open_set(url)
    assert s.manifest["hook"] == "blocks.2.hook_mlp_out" and len(s) == 4
    bridge = load_bridge(resolve_model(ModelSpec(str(tiny_models["gpt2"]))))
    seen = 0
    for shard in s:
        assert shard.activations.shape == (4, 32, 32) and shard.tokens.dtype == torch.int32
        assert (shard.tokens[:, 0] == 0).all(), "every sequence starts with BOS"
        with torch.inference_mode():
            _, cache = bridge.run_with_cache(shard.tokens.long())
        torch.testing.assert_close(shard.activations, cache["blocks.2.hook_mlp_out"], rtol=0, atol=0)
        seen += shard.tokens.numel()
    assert seen == s.n_tokens == 512


def test_tokens_are_the_packed_corpus(base_config, corpus, tiny_models):
    from transformers import AutoTokenizer

    s = actcache.open_set(actcache.extract(base_config))
    tok = AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    stream = []
    for line in corpus.read_text().splitlines():
        if line.strip():
            stream += tok(line, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(stream) > 600:
            break
    flat = torch.cat([sh.tokens for sh in s]).reshape(-1, 32)[:, 1:].reshape(-1)
    assert flat.tolist() == stream[: len(flat)]


def test_bad_input_raises_before_prefect_runs(base_config):
    with pytest.raises(actcache.ActcacheError, match="unknown hook"):
        actcache.extract(base_config, hook="blocks.0.hook_nope")
