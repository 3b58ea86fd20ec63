"""Hook names: the layer of a name, the closest valid names, the catalogue of a model's hooks and shapes."""

from __future__ import annotations

import pytest

from actcache.errors import ActcacheError
from actcache.inputs.bridge import load_bridge
from actcache.inputs.hooks import check_hook_name, hook_layer
from actcache.inputs.model import ModelSpec, resolve_model


def test_hook_helpers():
    assert hook_layer("blocks.11.attn.hook_z") == 11 and hook_layer("hook_embed") is None
    with pytest.raises(ActcacheError, match="did you mean blocks.3.hook_resid_post"):
        check_hook_name("blocks.3.hook_resid_pst", ["blocks.3.hook_resid_post", "blocks.3.hook_mlp_out"])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hook_catalog_matches_the_loaded_bridge_and_is_kept_on_disk(tiny_models, arch, monkeypatch):
    """Built without weights (meta for Llama; GPT-2's fused QKV needs a CPU skeleton), then read back from disk."""
    import actcache.inputs.hooks
    from actcache.extraction.forward import Extractor
    from actcache.inputs.hooks import hook_catalog

    built = []
    real = actcache.inputs.hooks._skeleton
    monkeypatch.setattr(actcache.inputs.hooks, "_skeleton", lambda m, o=None: built.append(o) or real(m, o))
    monkeypatch.setattr(actcache.inputs.hooks, "_CATALOGS", {})
    model = resolve_model(ModelSpec(str(tiny_models[arch])))
    actcache.inputs.hooks._catalog_path(model).unlink(missing_ok=True)
    catalog = hook_catalog(model)
    assert built == ([None, {"n_layer": 2}] if arch == "gpt2" else [None])  # meta first; GPT-2: two CPU blocks
    bridge = load_bridge(model)
    assert catalog.names == tuple(sorted(bridge.hook_dict))
    some = ["blocks.1.hook_resid_post", "blocks.2.attn.hook_z", "blocks.0.hook_mlp_out", "hook_embed"]
    some += ["blocks.2.hook_mlp_in", "blocks.1.attn.hook_result"]  # off in TransformerLens 4 until a flag opens them
    assert {h: list(catalog.per_token[h]) for h in some} == Extractor(bridge, some, batch_size=1).hook_shapes()
    assert "blocks.0.attn.hook_pattern" in catalog.other and "blocks.0.attn.hook_pattern" not in catalog.per_token

    def no_probe(_model):
        raise AssertionError("probed again instead of reading the catalogue from disk")

    monkeypatch.setattr(actcache.inputs.hooks, "_CATALOGS", {})  # a new process
    monkeypatch.setattr(actcache.inputs.hooks, "_probe_catalog", no_probe)
    assert hook_catalog(model) == catalog


def test_gated_hooks_are_listed_with_their_shape_and_copies_point_to_the_block_input(tiny_models):
    """hook_mlp_in and attn.hook_result are probed with their gate open (extraction opens it); the per-head copies of
    the block's input (hook_q_input, ...) stay refused, naming the hook that holds the same vector."""
    from actcache.inputs.hooks import check_hook, hook_catalog

    model = resolve_model(ModelSpec(str(tiny_models["llama"])))
    catalog = hook_catalog(model)
    d, n_heads = model.config.hidden_size, model.config.num_attention_heads
    assert catalog.per_token["blocks.0.hook_mlp_in"] == (d,)
    assert catalog.per_token["blocks.2.attn.hook_result"] == (n_heads, d)
    assert check_hook("blocks.2.attn.hook_result", model, catalog) == (n_heads, d)
    for copy in ("blocks.1.attn.hook_q_input", "blocks.1.hook_v_input", "blocks.1.hook_attn_in"):
        with pytest.raises(ActcacheError) as e:
            check_hook(copy, model, catalog)
        assert str(e.value) == (
            f"hook {copy!r} is off in TransformerLens 4 unless switched on: the block's hook_resid_pre copied once "
            "per head; extract blocks.1.hook_resid_pre instead"
        )
    with pytest.raises(ActcacheError, match=r"per token \[batch, pos, ...\]; pick a per-token hook such as hook_resid"):
        check_hook("blocks.0.attn.hook_pattern", model, catalog)


def test_why_a_gated_hook_stays_silent():
    """Refused by TransformerLens for this architecture (OPT's and GPT-J's attention have no per-head result), or
    silent even with its flag on (GPT-J and Phi run attention and MLP in parallel: no hook_mlp_in)."""
    from actcache.inputs.hooks import _silent

    assert _silent("blocks.1.attn.hook_result", "use_attn_result", True) == (
        "needs TransformerLens's use_attn_result, which it does not support for this model's attention"
    )
    assert _silent("blocks.1.hook_mlp_in", "use_hook_mlp_in", False) == (
        "does not fire in a forward pass of this model, even with TransformerLens's use_hook_mlp_in on"
    )
    assert _silent("blocks.1.attn.hook_rot_q", None, False) == "does not fire in a plain forward pass"
