"""The hf-sdpa engine (bare HF model, sdpa) against the bridge and HF's own hidden states, and its key."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from actcache.extraction import forward
from actcache.extraction.forward import HF_SDPA, Extractor, extractor_for, forward_engine
from actcache.inputs.model import ModelSpec, load_bridge, resolve_model

ARCHS = ["gpt2", "llama", "neox"]
RESID = [f"blocks.{layer}.hook_{kind}" for layer in range(3) for kind in ("resid_pre", "resid_post", "in", "out")]


def _model(path):
    return resolve_model(ModelSpec(str(path)))


def _tokens(vocab: int, n: int = 5, t: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randint(1, vocab, (n, t), generator=g, dtype=torch.int32)


@pytest.mark.parametrize("arch", ARCHS)
def test_residual_hooks_take_the_fast_engine_and_equal_the_bridge(tiny_models, arch):
    model = _model(tiny_models[arch])
    assert {forward_engine(h, model) for h in RESID} == {HF_SDPA}
    tokens = _tokens(model.config.vocab_size)
    fast = extractor_for(model, RESID, batch_size=2)(tokens)
    slow = Extractor(load_bridge(model), RESID, batch_size=2)(tokens)
    for h in RESID:
        assert fast[h].shape == slow[h].shape == (5, 24, model.config.hidden_size)
        # sdpa vs eager attention: equal to fp32 rounding, not bit for bit (hence SetKey.forward).
        torch.testing.assert_close(fast[h], slow[h], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_engine_equals_hf_hidden_states(tiny_models, arch):
    from transformers import AutoModelForCausalLM

    model = _model(tiny_models[arch])
    hf = AutoModelForCausalLM.from_pretrained(tiny_models[arch], attn_implementation="sdpa").eval()
    tokens = _tokens(model.config.vocab_size)
    with torch.inference_mode():
        hidden = hf(tokens.long(), output_hidden_states=True).hidden_states
    hooks = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    got = extractor_for(model, hooks, batch_size=5)(tokens)  # same batch as the reference: same kernels
    for h, i in zip(hooks, (0, 1, 2), strict=True):
        torch.testing.assert_close(got[h], hidden[i], rtol=0, atol=0)


def test_result_does_not_depend_on_batch_size(tiny_models):
    model = _model(tiny_models["llama"])
    tokens = _tokens(model.config.vocab_size, n=7)
    hook = "blocks.2.hook_resid_post"
    ref = extractor_for(model, [hook], batch_size=7)(tokens)[hook]
    for bs in (1, 3):
        assert torch.equal(extractor_for(model, [hook], batch_size=bs)(tokens)[hook], ref)


def test_other_hooks_and_remote_code_stay_on_the_bridge(tiny_models):
    model = _model(tiny_models["gpt2"])
    for hook in (
        "blocks.1.attn.hook_z",
        "blocks.1.hook_mlp_out",
        "blocks.0.hook_resid_mid",
        "hook_embed",
        "ln_final.hook_normalized",
        "blocks.1.hook_resid_post_extra",
    ):
        assert forward_engine(hook, model) == forward.BRIDGE, hook
    remote = resolve_model(ModelSpec(str(tiny_models["gpt2"]), trust_remote_code=True))
    assert forward_engine("blocks.1.hook_resid_post", remote) == forward.BRIDGE


def test_fast_hooks_never_load_the_bridge_and_stop_at_the_deepest_block(tiny_models, monkeypatch):
    import actcache.inputs.model

    def no_bridge(*a, **k):
        raise AssertionError("the bridge was loaded for hooks the hf-sdpa engine serves")

    monkeypatch.setattr(actcache.inputs.model, "load_bridge", no_bridge)
    monkeypatch.setattr(forward, "_HF", {})  # a fresh load, not a deeper stack other tests left behind
    model = _model(tiny_models["neox"])
    step = extractor_for(model, ["blocks.0.hook_resid_post"], batch_size=2)
    (part,) = step.parts
    assert len(part.layers) == 1  # later blocks are not even loaded
    fired = []
    handles = [part.model.final_layer_norm.register_forward_hook(lambda *a: fired.append("norm"))]
    try:
        step(_tokens(model.config.vocab_size))
    finally:
        for h in handles:
            h.remove()
    assert fired == []


def test_mixed_hooks_use_both_engines_in_one_step(tiny_models):
    model = _model(tiny_models["gpt2"])
    bridge = load_bridge(model)
    hooks = ["blocks.1.hook_resid_post", "blocks.2.attn.hook_z"]
    step = extractor_for(model, hooks, batch_size=2, bridge=bridge)
    assert [type(p).__name__ for p in step.parts] == ["HFExtractor", "Extractor"]
    tokens = _tokens(model.config.vocab_size)
    got = step(tokens)
    assert step.hook_shapes() == {"blocks.1.hook_resid_post": [32], "blocks.2.attn.hook_z": [4, 8]}
    torch.testing.assert_close(
        got["blocks.2.attn.hook_z"],
        Extractor(bridge, "blocks.2.attn.hook_z", batch_size=2)(tokens)["blocks.2.attn.hook_z"],
        rtol=0,
        atol=0,
    )


def test_engine_is_part_of_the_set_key(base_config):
    from actcache.extraction.plan import make_plan

    plan = make_plan(base_config.replace(hook="blocks.1.hook_resid_post,blocks.1.attn.hook_z"))
    fast, slow = plan.sets
    assert (fast.key.forward, slow.key.forward) == (HF_SDPA, "bridge")
    assert fast.hook_shape == (32,)
    other = dataclasses.replace(fast.key, forward="bridge")
    assert other.id != fast.key.id
