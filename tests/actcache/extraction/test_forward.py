"""Activations equal what the model computes: HF hidden states, and an unfiltered run_with_cache."""

from __future__ import annotations

import pytest
import torch

from actcache.extraction.forward import Extractor
from actcache.inputs.model import ModelSpec, load_bridge, resolve_model


def _bridge(path):
    return load_bridge(resolve_model(ModelSpec(str(path))))


def _tokens(vocab: int, n: int = 3, t: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, vocab, (n, t), generator=g, dtype=torch.int32)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("layer", [0, 1])  # the last hidden state has the final norm applied
def test_resid_post_equals_hf_hidden_states(tiny_models, arch, layer):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()
    tokens = _tokens(hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(tokens.long(), output_hidden_states=True).hidden_states[layer + 1]
    hook = f"blocks.{layer}.hook_resid_post"
    got = Extractor(_bridge(tiny_models[arch]), hook, batch_size=2)(tokens)[hook]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
@pytest.mark.parametrize(
    "hook",
    [
        "blocks.1.hook_mlp_out",
        "blocks.2.attn.hook_z",
        "blocks.0.hook_attn_out",
        "blocks.2.hook_resid_post",
        "hook_embed",
        "ln_final.hook_normalized",
    ],
)
def test_equals_unfiltered_run_with_cache(tiny_models, arch, hook):
    bridge = _bridge(tiny_models[arch])
    if hook not in bridge.hook_dict:
        pytest.skip(f"{arch} has no {hook}")
    tokens = _tokens(bridge.cfg.d_vocab)
    with torch.inference_mode():
        _, cache = bridge.run_with_cache(tokens.long())
    expected = cache[hook]
    got = Extractor(bridge, hook, batch_size=2)(tokens)[hook]
    torch.testing.assert_close(got, expected.reshape(*expected.shape[:2], -1), rtol=0, atol=0)


def test_several_hooks_in_one_pass_match_single_hook_runs(tiny_models):
    bridge = _bridge(tiny_models["gpt2"])
    tokens = _tokens(bridge.cfg.d_vocab)
    hooks = ["blocks.0.hook_resid_post", "blocks.2.attn.hook_z", "blocks.1.hook_mlp_out"]
    together = Extractor(bridge, hooks, batch_size=2)(tokens)
    for h in hooks:
        torch.testing.assert_close(together[h], Extractor(bridge, h, batch_size=3)(tokens)[h], rtol=0, atol=0)


def test_forward_stops_at_the_hook(tiny_models):
    """Nothing after the hook runs: not the next block, not the final norm, not the unembedding."""
    bridge = _bridge(tiny_models["gpt2"])
    fired: list[str] = []
    spies = ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre", "ln_final.hook_normalized", "unembed.hook_out"]
    for name in spies:
        bridge.hook_dict[name].add_hook(lambda act, hook: fired.append(hook.name))
    try:
        Extractor(bridge, "blocks.0.hook_resid_post", batch_size=3)(_tokens(bridge.cfg.d_vocab))
        assert fired == []
        Extractor(bridge, "blocks.2.hook_resid_post", batch_size=3)(_tokens(bridge.cfg.d_vocab))
        assert "unembed.hook_out" not in fired and "ln_final.hook_normalized" not in fired
        assert any("blocks.2" in f or "resid_pre" in f for f in fired)  # the spies do work
    finally:
        for name in spies:
            bridge.hook_dict[name].remove_hooks()


def test_non_per_token_hook_is_refused(tiny_models):
    from actcache.errors import ActcacheError

    bridge = _bridge(tiny_models["gpt2"])
    with pytest.raises(ActcacheError, match="not one vector per token"):
        Extractor(bridge, "blocks.0.attn.hook_pattern", batch_size=1).hook_shapes()
