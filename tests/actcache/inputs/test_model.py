"""Model resolution: hub ids through the HF cache (offline), local directories, fingerprints."""

from __future__ import annotations

import shutil

import pytest

from actcache.errors import ActcacheError
from actcache.inputs.model import ModelSpec, load_bridge, resolve_model

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, tiny_models, monkeypatch):
    """An HF hub cache holding `acme/tiny` at commit SHA, laid out as huggingface_hub writes it."""
    repo = tmp_path / "hub" / "models--acme--tiny"
    snap = repo / "snapshots" / SHA
    shutil.copytree(tiny_models["gpt2"], snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    return snap


def test_hub_id_resolves_to_its_commit_offline_and_loads(hub_cache):
    m = resolve_model(ModelSpec("acme/tiny"))
    assert m.fingerprint == f"hf:{SHA}" and m.revision == SHA
    assert m.n_layers == 3 and m.max_context == 128
    bridge = load_bridge(m)
    assert "blocks.2.hook_resid_post" in bridge.hook_dict


def test_unknown_hub_id_is_one_clear_line():
    with pytest.raises(ActcacheError, match="not found") as e:
        resolve_model(ModelSpec("acme/missing-model"))
    assert "\n" not in str(e.value)


def test_local_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ActcacheError, match="no weight files"):
        resolve_model(ModelSpec(str(tmp_path)))


def test_facts_are_remembered_by_content_and_equal_a_fresh_read(tiny_models, tmp_path, monkeypatch):
    """A second resolution reads config/tokenizer facts from the memo (no transformers); a changed tokenizer file
    is a new key, read afresh."""
    from actcache.inputs.model import ResolvedModel

    folder = tmp_path / "model"
    shutil.copytree(tiny_models["neox"], folder)
    first = resolve_model(ModelSpec(str(folder)))
    fresh = first._read_facts()  # the slow reference: config and tokenizer loaded now
    assert first.facts == fresh and fresh["n_layers"] == 3 and fresh["model_type"] == "gpt_neox"

    def no_loading(self):
        raise AssertionError("the memo should have answered")

    monkeypatch.setattr(ResolvedModel, "_read_facts", no_loading)
    again = resolve_model(ModelSpec(str(folder)))
    assert again.facts == fresh and again.tokenizer_fingerprint == fresh["tokenizer_fingerprint"]

    cfg = folder / "tokenizer_config.json"
    cfg.write_text(cfg.read_text() + " ")  # same meaning, new bytes
    with pytest.raises(AssertionError, match="memo should have answered"):
        _ = resolve_model(ModelSpec(str(folder))).facts


# -- issue 12: a tokenizer that cannot tokenize is refused before anything is written -------------------------
class _Broken:
    """Stand-ins for what a model folder can hand back as its tokenizer."""

    def __init__(self, encode, decode=lambda ids: ""):
        self.encode_, self.decode_ = encode, decode

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self.encode_(text)}

    def decode(self, ids, skip_special_tokens=True):
        return self.decode_(ids)


@pytest.mark.parametrize(
    "tok,why",
    [
        (_Broken(lambda t: []), "into 0 ids"),  # what transformers builds from a folder without tokenizer files
        (_Broken(lambda t: [3] * len(t)), "1 distinct"),  # everything one (unknown) id
        (_Broken(lambda t: [ord(c) % 2 for c in t], lambda ids: "<unk>" * len(ids)), "decodes back as"),
        (_Broken(lambda t: [ord(c) for c in t], lambda ids: "".join(chr(i) for i in ids[:10])), "decodes back as"),
        (_Broken(lambda t: 1 / 0), "fails on plain text"),
    ],
)
def test_tokenizers_that_cannot_tokenize_are_refused(tok, why):
    from actcache.inputs.model import check_tokenizer

    with pytest.raises(ActcacheError, match=f"tokenizer of 'm' cannot tokenize: .*{why}"):
        check_tokenizer(tok, "m")


def test_real_tokenizers_pass_the_probe(tiny_models):
    from transformers import AutoTokenizer

    from actcache.inputs.model import check_tokenizer

    for arch in ("gpt2", "llama", "neox"):
        check_tokenizer(AutoTokenizer.from_pretrained(tiny_models[arch]), arch)
    chars = _Broken(lambda t: [ord(c) for c in t], lambda ids: "".join(chr(i) for i in ids).upper())
    check_tokenizer(chars, "upper-casing")  # case and spacing may change on the way back


def test_a_model_folder_without_tokenizer_files_is_refused(tiny_models, tmp_path):
    dest = tmp_path / "m"
    shutil.copytree(tiny_models["gpt2"], dest)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (dest / name).unlink()
    with pytest.raises(ActcacheError, match="cannot tokenize: .* into 0 ids.*tokenizer files"):
        resolve_model(ModelSpec(str(dest))).tokenizer  # noqa: B018 - loading it is the point
