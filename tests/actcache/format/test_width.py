"""The width a set's key vouches for: a model config checked against the key's fingerprint, and the hook rule."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import pytest

from actcache.format import width
from actcache.format.key import SetKey, TokensKey
from actcache.inputs.model import ModelSpec, hook_catalog, resolve_model


def _key(model: str, hook: str = "blocks.1.hook_resid_post", **fields: str) -> SetKey:
    tokens = TokensKey(
        dataset="files:aa",
        tokenizer="tt",
        text_column="text",
        context_size=16,
        prepend_bos=True,
        separator=None,
        seqs_per_shard=4,
    )
    return SetKey(tokens, model, "float32", hook, "float16", "zstd", 3, **fields)


def test_the_hook_rule_never_understates_a_hook_of_the_test_models(tiny_models):
    """For every per-token hook the rule knows, of GPT-2, Llama (grouped-query attention) and GPT-NeoX as their
    bridges give them: the rule's shape holds at least the hook's values (exactly, but for a grouped-query k/v and
    the MLP's input, bounded at twice its width), so no true set is refused; and it knows the hooks people extract."""
    for arch, path in tiny_models.items():
        config = json.loads((path / "config.json").read_text())
        catalog = hook_catalog(resolve_model(ModelSpec(str(path))))
        known = {h: width.hook_shape(config, h) for h in catalog.per_token}
        for hook, shape in catalog.per_token.items():
            rule = known[hook]
            if rule is None:
                continue
            assert math.prod(shape) <= math.prod(rule), (arch, hook, shape, rule)
            if hook.endswith(("mlp.hook_pre", "mlp.hook_pre_linear")):
                assert math.prod(rule) == 2 * math.prod(shape), (arch, hook, shape, rule)
            elif not hook.endswith(("attn.hook_k", "attn.hook_v")):
                assert math.prod(shape) == math.prod(rule), (arch, hook, shape, rule)
        for hook in ("hook_embed", "blocks.0.hook_resid_post", "blocks.1.mlp.hook_post", "blocks.0.attn.hook_z"):
            assert known[hook] is not None, (arch, hook)
    assert width.hook_shape({"n_embd": 768, "n_head": 12, "n_inner": None}, "blocks.3.mlp.hook_post") == (3072,)
    assert width.hook_shape({"hidden_size": 64}, "blocks.0.attn.hook_z") is None  # no head count: no rule
    assert width.hook_shape({"hidden_size": 64}, "blocks.0.hook_something_new") is None


def test_a_local_models_config_counts_only_when_it_gives_the_keys_fingerprint(tiny_models, tmp_path):
    """The manifest carries config.json and the hashes the fingerprint combines; a reader recomputes the
    fingerprint. An edited config, an edited hash, or another model's config is not the key's: no width then."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["gpt2"], folder)
    model = resolve_model(ModelSpec(str(folder)))
    m = {"model_config": model.config_witness()}
    key = _key(model.fingerprint)
    assert width.model_config(key, m) == json.loads((folder / "config.json").read_text())
    assert width.key_width(key, m) == 32
    assert width.key_width(key, {}) is None  # a set written before manifests carried it
    assert width.key_width(_key("local:" + "0" * 40), m) is None  # another model's config
    wide = m["model_config"]["config"].replace('"n_embd": 32', '"n_embd": 4194304')
    assert wide != m["model_config"]["config"]
    assert width.key_width(key, {"model_config": {**m["model_config"], "config": wide}}) is None
    files = {**m["model_config"]["files"], "config.json": hashlib.sha256(wide.encode()).hexdigest()}
    assert width.key_width(key, {"model_config": {"files": files, "config": wide}}) is None
    crlf = folder / "config.json"  # its bytes as hashed, whatever its line ends
    crlf.write_bytes(crlf.read_bytes().replace(b"\n", b"\r\n"))
    model = resolve_model(ModelSpec(str(folder)))
    assert width.key_width(_key(model.fingerprint), {"model_config": model.config_witness()}) == 32


def test_a_hub_models_config_comes_from_the_hugging_face_cache(tmp_path, monkeypatch):
    """``hf:<sha>``: the commit's config.json in the local cache (whatever the repository's name), else nothing."""
    sha = "ab" * 20
    snap = tmp_path / "hub" / "models--org--m" / "snapshots" / sha
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"hidden_size": 48, "num_attention_heads": 4}))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert width.key_width(_key("hf:" + sha), {}) == 48
    assert width.key_width(_key("hf:" + sha, "blocks.0.attn.hook_z", heads="0,3"), {}) == 2 * 12
    assert width.key_width(_key("hf:" + "cd" * 20), {}) is None
    assert width.key_width(_key("hf:../../" + sha[8:]), {}) is None  # not a sha: never a path


@pytest.mark.parametrize(
    ("hook", "fields", "expected"),
    [
        ("blocks.0.attn.hook_z", {"heads": "0,1", "dims": "0,2,5"}, 2 * 3),
        ("blocks.0.hook_resid_post", {"dims": "1,5,7"}, 3),
        ("blocks.0.attn.hook_z", {"dims": "0,1"}, None),  # how many heads: only the config says
        ("blocks.0.hook_resid_post", {}, None),
    ],
)
def test_a_selection_in_the_key_gives_a_width_without_the_config(hook, fields, expected):
    """The key holds the kept indices: a selection of both axes (or of a vector's one) is a width by itself."""
    assert width.key_width(_key("hf:" + "ef" * 20, hook, **fields), {}) == expected
