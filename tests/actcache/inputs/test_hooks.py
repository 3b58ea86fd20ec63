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
    assert {h: list(catalog.per_token[h]) for h in some} == Extractor(bridge, some, batch_size=1).hook_shapes()
    assert "blocks.0.attn.hook_pattern" in catalog.other and "blocks.0.attn.hook_pattern" not in catalog.per_token

    def no_probe(_model):
        raise AssertionError("probed again instead of reading the catalogue from disk")

    monkeypatch.setattr(actcache.inputs.hooks, "_CATALOGS", {})  # a new process
    monkeypatch.setattr(actcache.inputs.hooks, "_probe_catalog", no_probe)
    assert hook_catalog(model) == catalog
