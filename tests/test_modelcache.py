"""The suite's tiny-model cache (tests/modelcache.py): built once, found again, rebuilt when its files changed."""

from __future__ import annotations

import modelcache

from actcache.inputs import demo

CFG = {"layers": 1, "d": 16, "ctx": 32}


def test_built_once_then_found_and_rebuilt_when_a_file_changed(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTCACHE_TEST_CACHE", str(tmp_path))
    builds = []
    real = demo.build_tiny_model

    def counted(*args, **kwargs):
        builds.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(demo, "build_tiny_model", counted)
    first = modelcache.tiny_model("gpt2", **CFG)
    assert (first / "config.json").is_file() and first.parent == tmp_path / "models" and len(builds) == 1
    assert modelcache.tiny_model("gpt2", **CFG) == first and len(builds) == 1  # a later session finds it

    weights = first / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # a test wrote into it
    assert modelcache.tiny_model("gpt2", **CFG) == first and len(builds) == 2
    assert weights.read_bytes() == good  # the builder is deterministic: the same bytes again

    assert modelcache.key("gpt2", **CFG) != modelcache.key("gpt2", **{**CFG, "d": 8})  # other arguments, other folder
    assert modelcache.key("gpt2", **CFG) != modelcache.key("llama", **CFG)
