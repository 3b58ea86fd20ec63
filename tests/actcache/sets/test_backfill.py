"""``actcache verify`` gives a set made before content ids (0.5.0) its content id and index entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actcache.cli.app import main
from actcache.config import ExtractConfig
from actcache.extraction import stages
from actcache.extraction.plan import make_plan
from actcache.extraction.stages import run_sequential
from actcache.format import content, records
from actcache.inputs import demo
from actcache.read.reader import open_set
from actcache.sets.backfill import content_of

CONTEXT = 16


@pytest.fixture(scope="module")
def inputs(tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    """The same 24 statements, with an int, a str, a float and a bool column, as text and as token ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    root = tmp_path_factory.mktemp("backfill")
    rows = [
        {"text": " ".join(line.split()[:20]), "label": i % 2, "source": f"doc{i}", "score": i / 3, "ok": i % 3 == 0}
        for i, line in enumerate(demo.corpus_lines()[:24])
    ]
    text, ids = root / "text.jsonl", root / "ids.jsonl"
    text.write_text("\n".join(json.dumps(r) for r in rows))
    ids.write_text(
        "\n".join(
            json.dumps({**r, "input_ids": tok(r.pop("text"), add_special_tokens=False)["input_ids"]}) for r in rows
        )
    )
    return text, ids


def _config(make_config, dataset: Path, store: Path, packing: str, **changes) -> ExtractConfig:
    """The suite's ``make_config`` on ``dataset`` into ``store``: sequences of 16, 8 to a shard, float32."""
    base = dict(
        dataset=str(dataset),
        store=str(store),
        context_size=CONTEXT,
        max_tokens=20 * CONTEXT,
        shard_tokens=8 * CONTEXT,
        dtype="float32",
        packing=packing,
    )
    if packing == "none":
        base |= dict(positions="last", keep_columns="label,source,score,ok")  # every kind of column
    return make_config(**{**base, **changes})


def _as_before_content_ids(store: Path, set_id: str) -> tuple[str, str]:
    """Set ``set_id`` as 0.4.0 left it: no content or family id in its manifest, no index entry. Returns them."""
    path = store / set_id / "manifest.json"
    m = json.loads(path.read_text())
    cid, fid = content.stored_id(m), content.stored_family(m)
    assert cid and fid
    (m["examples"] if m.get("examples") else m).pop(content.MANIFEST_FIELD)
    (m["examples"] if m.get("examples") else m).pop(content.FAMILY_FIELD)
    path.write_text(json.dumps(records.sealed(m), indent=1))  # as 0.4.0 wrote it, sealed
    (store / "_content" / f"{cid}.json").unlink()
    (store / "_content" / f"{fid}.json").unlink()
    return cid, fid


@pytest.mark.parametrize("packing", ["none", "concat"])
def test_verify_indexes_a_set_made_before_content_ids(make_config, inputs, tmp_path, capsys, packing):
    text, ids = inputs
    store = tmp_path / "s"
    (url,) = run_sequential(_config(make_config, text, store, packing))
    set_id = url.rsplit("/", 1)[1]
    cid, fid = _as_before_content_ids(store, set_id)
    column = _config(make_config, ids, store, packing, token_column="input_ids")
    if packing == "concat":
        stages.tokenize(make_plan(column, load_model=False))  # its token shards stored: a plan can look it up
    assert make_plan(column, load_model=False).sets[0].stored_as is None  # not found: no entry
    assert content_of(open_set(url)) == cid  # what the writer computed, from the shards alone

    assert main(["verify", url]) == 0
    out = capsys.readouterr()
    assert "all checksums match" in out.out and f"indexed its content id {cid}" in out.err
    m = json.loads((store / set_id / "manifest.json").read_text())
    assert content.stored_id(m) == cid and content.stored_family(m) == fid  # as the writer gave them
    for entry in (cid, fid):
        assert json.loads((store / "_content" / f"{entry}.json").read_text())["set_id"] == set_id
    plan = make_plan(column, load_model=False)
    assert plan.sets[0].stored_as == set_id and plan.urls == [url] and not plan.has_missing
    assert main(["verify", url, "--json"]) == 0  # indexed once: nothing more to do
    assert json.loads(capsys.readouterr().out)["content_indexed"] is None


def test_a_set_whose_shards_fail_or_whose_tokens_are_gone_gets_no_entry(make_config, inputs, tmp_path, capsys):
    text, _ = inputs
    store = tmp_path / "s"
    (url,) = run_sequential(_config(make_config, text, store, "concat"))
    set_id = url.rsplit("/", 1)[1]
    _as_before_content_ids(store, set_id)
    for tokens in (store / "_tokens").iterdir():  # a copied set: its token cache stayed behind
        for f in tokens.rglob("*.json"):
            f.unlink()
    assert main(["verify", url]) == 0
    assert "indexed" not in capsys.readouterr().err and not any((store / "_content").iterdir())
    assert content.stored_id(json.loads((store / set_id / "manifest.json").read_text())) is None


def test_verify_gives_a_set_made_by_0_5_0_its_family(make_config, inputs, tmp_path, capsys):
    """0.5.0 wrote the content id and entry, no family: verify adds it, and a request for fewer examples from the
    other input then reuses the set."""
    text, ids = inputs
    store = tmp_path / "s"
    (url,) = run_sequential(_config(make_config, text, store, "none"))
    set_id = url.rsplit("/", 1)[1]
    path = store / set_id / "manifest.json"
    m = json.loads(path.read_text())
    fid = m["examples"].pop(content.FAMILY_FIELD)
    path.write_text(json.dumps(records.sealed(m), indent=1))
    (store / "_content" / f"{fid}.json").unlink()
    fewer = _config(make_config, ids, store, "none", token_column="input_ids", max_tokens=10 * CONTEXT)
    assert make_plan(fewer, load_model=False).sets[0].stored_as is None
    assert main(["verify", url]) == 0
    assert "indexed its content id" in capsys.readouterr().err
    assert content.stored_family(json.loads(path.read_text())) == fid
    assert make_plan(fewer, load_model=False).urls == [url]


def test_a_set_extended_while_it_is_verified_keeps_its_new_shards(make_config, inputs, tmp_path, capsys, monkeypatch):
    """Verifying reads every shard (minutes on a large set); a run that extends the set meanwhile writes a larger
    manifest. Writing back the manifest as verified, with its content id added, would drop the new shards from it."""
    from actcache.read.reader import ActivationSet

    text, _ = inputs
    store = tmp_path / "s"
    (url,) = run_sequential(_config(make_config, text, store, "none", max_tokens=8 * CONTEXT))
    set_id = url.rsplit("/", 1)[1]
    _as_before_content_ids(store, set_id)
    real = ActivationSet.verify

    def verify_while_extended(self, *args, **kwargs):
        problems = real(self, *args, **kwargs)
        run_sequential(_config(make_config, text, store, "none"))  # --max-tokens raised: the same set, extended
        return problems

    monkeypatch.setattr(ActivationSet, "verify", verify_while_extended)
    before = len(json.loads((store / set_id / "manifest.json").read_text())["shards"])
    assert main(["verify", url]) == 0
    after = json.loads((store / set_id / "manifest.json").read_text())
    assert len(after["shards"]) > before and open_set(url).verify() == []
    assert "indexed" not in capsys.readouterr().err
