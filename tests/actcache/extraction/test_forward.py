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


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_gated_hooks_equal_run_with_cache_with_their_flag_on(tiny_models, arch):
    """hook_mlp_in and attn.hook_result, which TransformerLens 4 keeps off, equal its own cache with the flag on,
    and mean what their names say: the residual before the MLP, and each head's part of the attention output.
    The bridge's flags are as they were afterwards."""
    bridge = _bridge(tiny_models[arch])
    tokens = _tokens(bridge.cfg.d_vocab)
    hooks = ["blocks.1.hook_mlp_in", "blocks.1.attn.hook_result"]
    got = Extractor(bridge, hooks, batch_size=2)(tokens)
    assert not bridge.cfg.use_hook_mlp_in and not bridge.cfg.use_attn_result
    with torch.inference_mode():
        _, plain = bridge.run_with_cache(tokens.long())
        for hook, flag in zip(hooks, ("use_hook_mlp_in", "use_attn_result"), strict=True):
            getattr(bridge, f"set_{flag}")(True)
            try:
                _, cache = bridge.run_with_cache(tokens.long())
            finally:
                getattr(bridge, f"set_{flag}")(False)
            expected = cache[hook]
            torch.testing.assert_close(got[hook], expected.reshape(*expected.shape[:2], -1), rtol=0, atol=0)
            if flag == "use_attn_result":
                b_o = getattr(bridge.blocks[1].attn, "b_O", None)
                summed = expected.sum(-2) + (0 if b_o is None else b_o)
                torch.testing.assert_close(summed, cache["blocks.1.hook_attn_out"], rtol=0, atol=0)
    # the residual the MLP branch reads: after attention, or the block's input where both read it (NeoX)
    entry = "blocks.1.hook_resid_mid" if "blocks.1.hook_resid_mid" in plain else "blocks.1.hook_resid_pre"
    assert (arch == "neox") == (entry == "blocks.1.hook_resid_pre")
    assert torch.equal(got["blocks.1.hook_mlp_in"], plain[entry])


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_hooks_beside_a_gated_one_keep_the_bytes_of_the_plain_pass(tiny_models, arch):
    """use_attn_result changes how attention sums its heads (attn_out and everything after it move by ~1e-8): the
    hooks asked beside hook_result come from a pass without it, bit for bit what they are alone, so a set's bytes
    do not depend on what else one command extracted. use_hook_mlp_in changes nothing and shares the plain pass."""
    bridge = _bridge(tiny_models[arch])
    tokens = _tokens(bridge.cfg.d_vocab)
    hooks = ["blocks.1.attn.hook_result", "blocks.1.hook_attn_out", "blocks.2.hook_resid_post", "blocks.1.hook_mlp_in"]
    together = Extractor(bridge, hooks, batch_size=2)(tokens)
    with torch.inference_mode():
        _, plain = bridge.run_with_cache(tokens.long())
    for h in hooks[1:]:
        assert torch.equal(together[h], Extractor(bridge, h, batch_size=3)(tokens)[h]), h
        if h in plain:
            assert torch.equal(together[h], plain[h]), h
    alone = Extractor(bridge, hooks[0], batch_size=3)(tokens)[hooks[0]]
    assert torch.equal(together[hooks[0]], alone)
