"""Loading the TransformerBridge of a resolved model."""

from __future__ import annotations

import shutil

import pytest

from actcache.errors import ActcacheError
from actcache.inputs.bridge import load_bridge
from actcache.inputs.model import ModelSpec, resolve_model


def test_a_local_model_changed_after_the_plan_is_refused_when_loaded(tiny_models, tmp_path):
    from actcache.extraction.forward import load_hf_stack

    shutil.copytree(tiny_models["gpt2"], tmp_path / "m")
    model = resolve_model(ModelSpec(str(tmp_path / "m")))  # pinned: its fingerprint is in the set key
    weights = next((tmp_path / "m").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # new weights, same size
    weights.write_bytes(bytes(data))
    for load in (load_bridge, lambda m: load_hf_stack(m, 1)):
        with pytest.raises(ActcacheError, match="changed while this run used it"):
            load(model)
