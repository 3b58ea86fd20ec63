"""Every field of the key changes the set id; nothing else does."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from actcache.extraction.plan import make_plan
from actcache.format.key import SetKey, TokensKey


def _key() -> SetKey:
    t = TokensKey(
        dataset="files:aa",
        tokenizer="tt",
        text_column="text",
        context_size=128,
        prepend_bos=True,
        separator=0,
        seqs_per_shard=64,
    )
    return SetKey(
        tokens=t,
        model="local:mm",
        model_dtype="float32",
        hook="blocks.1.hook_resid_post",
        dtype="float16",
        codec="none",
        codec_level=0,
    )


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if value is None:
        return 7
    return value + "x"


def test_every_field_changes_the_digest():
    base = _key()
    seen = {base.id}
    for f in dataclasses.fields(TokensKey):
        t = dataclasses.replace(base.tokens, **{f.name: _changed(getattr(base.tokens, f.name))})
        seen.add(dataclasses.replace(base, tokens=t).id)
    for f in dataclasses.fields(SetKey):
        if f.name != "tokens":
            seen.add(dataclasses.replace(base, **{f.name: _changed(getattr(base, f.name))}).id)
    assert len(seen) == 1 + len(dataclasses.fields(TokensKey)) + len(dataclasses.fields(SetKey)) - 1


def test_key_round_trips_through_json():
    k = _key()
    assert SetKey.from_dict(json.loads(json.dumps(k.to_dict()))) == k


@pytest.fixture
def plan_id(base_config):
    def set_id(**changes) -> str:
        return make_plan(base_config.replace(**changes)).sets[0].set_id

    return set_id


def test_user_options_that_change_bytes_change_the_set(plan_id, tiny_models, tmp_path, corpus):
    other_text = tmp_path / "other.txt"
    other_text.write_text(corpus.read_text()[:-200])
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"text": line, "body": line[::-1]}) for line in corpus.read_text().splitlines())
    )
    base = plan_id()
    variants = {
        "model": plan_id(model=str(tiny_models["llama"])),
        "hook": plan_id(hook="blocks.1.hook_mlp_out"),
        "dataset": plan_id(dataset=str(other_text)),
        "text_column": plan_id(dataset=str(jsonl), text_column="body"),
        "context_size": plan_id(context_size=64),
        "prepend_bos": plan_id(prepend_bos=False),
        "separator": plan_id(separator="none"),
        "shard_tokens": plan_id(shard_tokens=256),
        "dtype": plan_id(dtype="bfloat16"),
        "model_dtype": plan_id(model_dtype="bfloat16"),
        "codec": plan_id(codec="zstd"),
        "codec_level": plan_id(codec="zstd", codec_level=9),
    }
    assert base not in variants.values()
    assert len(set(variants.values())) == len(variants)


def test_options_that_do_not_change_bytes_keep_the_set(plan_id, tmp_path):
    base = plan_id()
    assert plan_id(max_tokens=4096) == base
    assert plan_id(batch_size=1) == base
    assert plan_id(store=str(tmp_path / "elsewhere")) == base
    assert plan_id(codec_level=9) == base  # no codec: the level cannot change a byte


def test_same_weights_elsewhere_same_set_changed_weights_new_set(base_config, tiny_models, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_models["gpt2"], copy)
    a = make_plan(base_config).sets[0].set_id
    assert make_plan(base_config.replace(model=str(copy))).sets[0].set_id == a
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 1
    weights.write_bytes(bytes(data))
    assert make_plan(base_config.replace(model=str(copy))).sets[0].set_id != a


def test_tokenizer_change_changes_the_set(base_config, tiny_models, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_models["gpt2"], copy)
    tok = json.loads((copy / "tokenizer.json").read_text())
    tok["normalizer"] = {"type": "Lowercase"}
    (copy / "tokenizer.json").write_text(json.dumps(tok))
    a = make_plan(base_config).sets[0]
    b = make_plan(base_config.replace(model=str(copy))).sets[0]
    assert a.key.model == b.key.model  # same weights...
    assert a.key.tokens.tokenizer != b.key.tokens.tokenizer and a.set_id != b.set_id  # ...other tokens


def test_existing_set_ids_do_not_change(tmp_path):
    """Ids of sets people already have (the key's digest, and what the plan fills it with) stay as they were."""
    from actcache.config import ExtractConfig

    assert (_key().id, _key().tokens.id) == ("55e28e42db2a60d02a288ae1", "tf8f381288dc1830f0a5d59ec")
    # The demo with the default of its time, 2^18 tokens per shard (shards are sized by bytes by default since
    # then): passing it reaches the same sets.
    old_default = {"shard_tokens": 1 << 18}
    ids = {
        hook: make_plan(ExtractConfig(hook=hook, store=str(tmp_path), device="cpu", **old_default), load_model=False)
        .sets[0]
        .set_id
        for hook in ("blocks.1.hook_resid_post", "blocks.1.attn.hook_z")
    }  # the demo: hf-sdpa and bridge engines
    assert ids == {
        "blocks.1.hook_resid_post": "b5bd6bb124eecb395006c2df",
        "blocks.1.attn.hook_z": "9a09fb5cb45fd4b035382ec4",
    }


def test_a_shuffle_key_is_its_own_kind():
    from actcache.format.key import ShuffleKey, key_from_dict

    s = ShuffleKey(source=_key().id, source_shards="ab" * 32, seed=3, rows_per_shard=4096, exclude=(0, 50256))
    assert s.id == "8b21fcca2a13462b5c6083d0"
    assert key_from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert key_from_dict(_key().to_dict()) == _key()
    seen = {s.id} | {
        dataclasses.replace(s, **{f.name: _changed(getattr(s, f.name))}).id
        for f in dataclasses.fields(ShuffleKey)
        if f.name != "exclude"
    }
    seen.add(dataclasses.replace(s, exclude=(0,)).id)
    assert len(seen) == len(dataclasses.fields(ShuffleKey)) + 1
