"""The same token ids give the same set, read from text or from --token-column (``extraction.reuse``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from actcache import api, crashpoints
from actcache.cli.app import main
from actcache.config import ExtractConfig
from actcache.extraction import examples
from actcache.extraction.plan import make_plan
from actcache.format import content, records
from actcache.inputs import demo
from actcache.read.examples import load_examples

CONTEXT = 32


@pytest.fixture(scope="module")
def inputs(tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    """The same 12 labelled statements twice: as text, and as the tiny GPT-2's token ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    root = tmp_path_factory.mktemp("reuse")
    rows = [{"text": " ".join(line.split()[:40]), "label": i % 2} for i, line in enumerate(demo.corpus_lines()[:12])]
    text, ids = root / "text.jsonl", root / "ids.jsonl"
    text.write_text("\n".join(json.dumps(r) for r in rows))
    ids.write_text(
        "\n".join(
            json.dumps({"input_ids": tok(r["text"], add_special_tokens=False)["input_ids"], "label": r["label"]})
            for r in rows
        )
    )
    return text, ids


def _config(tiny_models, dataset: Path, store: str, **changes) -> ExtractConfig:
    base = dict(
        model=str(tiny_models["gpt2"]),
        dataset=str(dataset),
        store=store,
        device="cpu",
        context_size=CONTEXT,
        max_tokens=1 << 12,
        shard_tokens=5 * CONTEXT,  # 5 examples per shard: 3 shards
        batch_size=4,
        dtype="float32",
        packing="none",
        keep_columns="label",
        hook="blocks.1.hook_resid_post",
    )
    return ExtractConfig(**{**base, **changes})


def _no_forward(monkeypatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("a forward pass ran for a set already stored")

    monkeypatch.setattr(examples, "compute_shard", refuse)


def _set_folders(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir() if not p.name.startswith("_"))


@pytest.mark.parametrize("first", ["text", "column"])
@pytest.mark.parametrize("positions", ["last", "all"])
def test_the_same_ids_reuse_the_set_from_text_or_column(tiny_models, inputs, tmp_path, monkeypatch, first, positions):
    text, ids = inputs
    store = tmp_path / "s"
    by = {
        "text": _config(tiny_models, text, str(store), positions=positions),
        "column": _config(tiny_models, ids, str(store), positions=positions, token_column="input_ids"),
    }
    second = "column" if first == "text" else "text"
    (url,) = examples.extract(make_plan(by[first]))
    stored = url.rsplit("/", 1)[1]
    _no_forward(monkeypatch)
    plan = make_plan(by[second])
    (s,) = plan.sets
    assert s.stored_as == stored and s.set_id != stored and not plan.has_missing
    assert plan.urls == [url]
    (result,) = api.extract_sets(by[second])
    assert (result.set_id, result.url, result.reused, result.requested_id) == (stored, url, True, s.set_id)
    assert result.shards_computed == 0 and result.complete and result.n_shards == 3
    assert _set_folders(store) == [stored]  # no second copy, no empty folder under the requested id
    got = load_examples(url)
    assert got.activations.shape[0] == 12 and got.columns["label"].tolist() == [i % 2 for i in range(12)]


def test_a_reused_set_equals_the_one_computed_from_the_other_input(tiny_models, inputs, tmp_path):
    """The set reused for the column holds what the column would have given (the other input, computed alone)."""
    text, ids = inputs
    (from_text,) = examples.extract(make_plan(_config(tiny_models, text, str(tmp_path / "a"), positions="-3:")))
    (from_ids,) = examples.extract(
        make_plan(_config(tiny_models, ids, str(tmp_path / "b"), positions="-3:", token_column="input_ids"))
    )
    a, b = load_examples(from_text), load_examples(from_ids)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.activations, b.activations)
    ca = json.loads((tmp_path / "a" / from_text.rsplit("/", 1)[1] / "manifest.json").read_text())
    cb = json.loads((tmp_path / "b" / from_ids.rsplit("/", 1)[1] / "manifest.json").read_text())
    assert ca["key"] != cb["key"] and ca["examples"]["content_id"] == cb["examples"]["content_id"]
    # Other settings that change the bytes give another content id: the set is computed, not reused.
    other = _config(tiny_models, ids, str(tmp_path / "a"), positions="-2:", token_column="input_ids")
    assert make_plan(other, load_model=False).sets[0].stored_as is None


def test_the_index_never_points_at_an_unfinished_set(tiny_models, inputs, tmp_path, monkeypatch):
    text, ids = inputs
    store = tmp_path / "s"
    real = crashpoints.point

    def crash_at(name):
        def point(at):
            real(at)
            if at == name:
                raise KeyboardInterrupt(at)  # killed here: nothing after this write happens

        monkeypatch.setattr(crashpoints, "point", point)

    crash_at("manifest.before-write")  # every shard stored, no manifest yet
    with pytest.raises(KeyboardInterrupt):
        examples.extract(make_plan(_config(tiny_models, text, str(store), positions="last")))
    assert not (store / "_content").exists()
    crash_at("content.before-index")  # the rerun completes the manifest, and is killed before the index entry
    with pytest.raises(KeyboardInterrupt):
        examples.extract(make_plan(_config(tiny_models, text, str(store), positions="last")))
    assert not (store / "_content").exists()
    monkeypatch.setattr(crashpoints, "point", real)
    # Not indexed: the column is computed as a set of its own (correct, only not shared) and indexed.
    column = _config(tiny_models, ids, str(store), positions="last", token_column="input_ids")
    plan = make_plan(column)
    assert plan.sets[0].stored_as is None and plan.has_missing
    examples.extract(plan)
    entries = list((store / "_content").iterdir())  # its content and its family
    assert len(entries) == 2 and all(json.loads(e.read_text())["set_id"] == plan.sets[0].set_id for e in entries)


def test_an_entry_whose_set_is_not_complete_is_ignored(tiny_models, inputs, tmp_path):
    text, ids = inputs
    store = tmp_path / "s"
    (url,) = examples.extract(make_plan(_config(tiny_models, text, str(store), positions="first")))
    stored = url.rsplit("/", 1)[1]
    column = _config(tiny_models, ids, str(store), positions="first", token_column="input_ids")
    column_key = make_plan(column, load_model=False).sets[0].key
    cid = json.loads((store / stored / "manifest.json").read_text())["examples"]["content_id"]
    (store / stored / "manifest.json").unlink()  # an `rm` under way, or a set whose manifest was lost
    assert content.lookup(column.store_ref.open(), cid, column_key) is None
    assert make_plan(column, load_model=False).sets[0].stored_as is None
    # A forged entry (to an unfinished set, or one whose seal does not match) is not followed either.
    (store / "_content" / f"{cid}.json").write_text(json.dumps({"content_id": cid, "set_id": stored}))
    assert content.lookup(column.store_ref.open(), cid, column_key) is None


def test_an_entry_to_a_set_of_other_bytes_is_not_followed(tiny_models, inputs, tmp_path):
    """A set of another hook whose manifest claims this content id (resealed: a seal is a line of code), and an
    entry pointing at it, are not reused: the set's key says its bytes are another hook's."""
    text, ids = inputs
    store = tmp_path / "s"
    (layer0,) = examples.extract(make_plan(_config(tiny_models, text, str(store), hook="blocks.0.hook_resid_post")))
    (layer1,) = examples.extract(make_plan(_config(tiny_models, text, str(tmp_path / "o"))))
    cid = json.loads(Path(layer1, "manifest.json").read_text())["examples"]["content_id"]
    forged = store / layer0.rsplit("/", 1)[1] / "manifest.json"
    m = json.loads(forged.read_text())
    m["examples"]["content_id"] = cid
    forged.write_text(json.dumps(records.sealed({k: v for k, v in m.items() if k != records.SEAL})))
    (store / "_content" / f"{cid}.json").write_text(
        json.dumps(records.sealed({"content_id": cid, "set_id": layer0.rsplit("/", 1)[1]}))
    )
    column = _config(tiny_models, ids, str(store), token_column="input_ids")  # blocks.1, as layer1
    plan = make_plan(column, load_model=False)
    assert plan.sets[0].stored_as is None and plan.has_missing
    assert content.lookup(column.store_ref.open(), cid, plan.sets[0].key) is None
    (url,) = examples.extract(make_plan(column))
    assert torch.equal(load_examples(url).activations, load_examples(layer1).activations)
    assert json.loads((store / "_content" / f"{cid}.json").read_text())["set_id"] == url.rsplit("/", 1)[1]


def test_json_show_and_ls_say_which_set_was_reused(tiny_models, inputs, tmp_path, capsys, monkeypatch):
    text, ids = inputs
    store = tmp_path / "s"
    common = ["--model", str(tiny_models["gpt2"]), "--store", str(store), "--device", "cpu", "--context-size", "32"]
    common += ["--max-tokens", "4096", "--packing", "none", "--positions", "last", "--dtype", "float32"]
    common += ["--shard-tokens", str(5 * CONTEXT), "--hook", "blocks.1.hook_resid_post"]  # as ``_config``'s
    (url,) = examples.extract(make_plan(_config(tiny_models, text, str(store), positions="last", keep_columns="")))
    capsys.readouterr()
    _no_forward(monkeypatch)
    assert main(["extract", *common, "--dataset", str(ids), "--token-column", "input_ids", "--json"]) == 0
    (got,) = json.loads(capsys.readouterr().out)["sets"]
    assert got["url"] == url and got["reused"] is True and got["requested_id"] != got["set_id"]
    assert main(["extract", *common, "--dataset", str(ids), "--token-column", "input_ids"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == url and "already stored" in out.err and "reused set" in out.err
    assert main(["show", url]) == 0
    cid = json.loads((Path(url) / "manifest.json").read_text())["examples"]["content_id"]
    assert f"content     {cid}" in capsys.readouterr().out
    assert main(["ls", str(store), "--json"]) == 0
    assert [s["content_id"] for s in json.loads(capsys.readouterr().out)["sets"]] == [cid]


def test_on_s3_the_column_reuses_the_text_set(tiny_models, inputs, s3_server, s3_env, monkeypatch, prefect_harness):
    """With a Prefect API (the flow runs even when nothing is missing, to record the run) as without one."""
    text, ids = inputs
    bucket = s3_server.new_prefix()
    (url,) = examples.extract(make_plan(_config(tiny_models, text, bucket, positions="mean")))
    keys = s3_server.keys_under(bucket)
    entries = [k for k in keys if k.startswith("_content/")]  # its content and its family
    assert len(entries) == 2 and all(json.loads(keys[e])["set_id"] == url.rsplit("/", 1)[1] for e in entries)
    _no_forward(monkeypatch)
    (result,) = api.extract_sets(_config(tiny_models, ids, bucket, positions="mean", token_column="input_ids"))
    assert result.reused and result.url == url
    assert set(s3_server.keys_under(bucket)) == set(keys)  # nothing written


def test_of_two_hooks_only_the_one_stored_is_reused(tiny_models, inputs, tmp_path):
    text, ids = inputs
    store = tmp_path / "s"
    (a,) = examples.extract(make_plan(_config(tiny_models, text, str(store), positions="last")))
    both = "blocks.1.hook_resid_post,blocks.0.hook_resid_post"
    plan = make_plan(_config(tiny_models, ids, str(store), positions="last", token_column="input_ids", hook=both))
    reused, computed = plan.sets
    assert reused.stored_as == a.rsplit("/", 1)[1] and computed.stored_as is None and plan.has_missing
    urls = examples.extract(plan)
    assert urls[0] == a and urls[1].endswith(computed.set_id)
    assert sorted(_set_folders(store)) == sorted([reused.stored_as, computed.set_id])
    layer0 = load_examples(urls[1])
    assert layer0.activations.shape[0] == 12 and torch.equal(layer0.tokens, load_examples(a).tokens)
    # The text run of both hooks now finds each stored: the first as it was made, the second via the index.
    again = make_plan(_config(tiny_models, text, str(store), positions="last", hook=both), load_model=False)
    assert not again.has_missing and again.urls == urls


def test_a_copied_set_is_reused_in_its_new_store(tiny_models, inputs, tmp_path, monkeypatch):
    """``actcache cp`` carries the set's content entry: the column finds the text set in the store it was copied to."""
    from actcache.sets.copy import copy_set

    text, ids = inputs
    (url,) = examples.extract(make_plan(_config(tiny_models, text, str(tmp_path / "a"), positions="last")))
    copied = copy_set(url, str(tmp_path / "b")).url
    _no_forward(monkeypatch)
    plan = make_plan(_config(tiny_models, ids, str(tmp_path / "b"), positions="last", token_column="input_ids"))
    assert plan.sets[0].stored_as == url.rsplit("/", 1)[1] and plan.urls == [copied] and not plan.has_missing


def test_fewer_examples_reuse_a_set_of_the_same_ids_more_are_computed(tiny_models, inputs, tmp_path, monkeypatch):
    """As the text's own rerun with a lower --max-tokens reads the set it has: the column's first 7 examples (a
    shard and part of the next) are the text set's first 7, checked from its shards, so it is reused whole. More
    examples than a set of the same ids holds are computed alone: that set is the other input's, never extended
    with ids read from this one."""
    text, ids = inputs
    store = tmp_path / "s"
    (url,) = examples.extract(make_plan(_config(tiny_models, text, str(store), positions="last")))
    _no_forward(monkeypatch)
    fewer = _config(tiny_models, ids, str(store), positions="last", token_column="input_ids", max_tokens=7 * CONTEXT)
    plan = make_plan(fewer)
    assert plan.sets[0].stored_as == url.rsplit("/", 1)[1] and plan.urls == [url] and not plan.has_missing
    (result,) = api.extract_sets(fewer)
    assert result.reused and result.url == url and result.shards_computed == 0 and result.n_shards == 3
    # Another first 7 (one label changed): the family is found, its shards do not hold them: computed alone.
    rows = [json.loads(line) for line in ids.read_text().splitlines()]
    rows[6]["label"] = 1 - rows[6]["label"]
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps(r) for r in rows))
    assert make_plan(fewer.replace(dataset=str(other)), load_model=False).sets[0].stored_as is None
    monkeypatch.undo()
    small = tmp_path / "small"
    (seven,) = examples.extract(make_plan(_config(tiny_models, text, str(small), positions="last", max_tokens=7 * 32)))
    plan = make_plan(_config(tiny_models, ids, str(small), positions="last", token_column="input_ids"))
    assert plan.sets[0].stored_as is None and plan.has_missing
    assert _set_folders(small) == [seven.rsplit("/", 1)[1]]


def test_a_reused_set_keeps_its_truncated_count_and_the_request_logs_its_own(tiny_models, tmp_path, caplog):
    """The manifest describes the set as made (its text had statements cut to the context); a column of the same
    ids already cut reuses it, and logs no truncation of its own."""
    rows = [{"text": " ".join(line.split()[:60]), "label": i % 2} for i, line in enumerate(demo.corpus_lines()[:12])]
    text = tmp_path / "long.jsonl"
    text.write_text("\n".join(json.dumps(r) for r in rows))
    store = tmp_path / "s"
    with caplog.at_level("WARNING", logger="actcache.extraction.examples"):
        (url,) = examples.extract(make_plan(_config(tiny_models, text, str(store), positions="last")))
    truncated = json.loads((Path(url) / "manifest.json").read_text())["examples"]["truncated"]
    assert truncated > 0 and f"{truncated} of 12 examples were longer" in caplog.text
    got = load_examples(url)  # each example's ids as fed: BOS, then the statement cut to the context
    bos = 1 if got.manifest["tokenization"]["prepend_bos"] else 0
    cut = tmp_path / "cut.jsonl"
    cut.write_text(
        "\n".join(
            json.dumps({"input_ids": got.tokens[i, bos : int(n)].tolist(), "label": r["label"]})
            for i, (n, r) in enumerate(zip(got.lengths, rows, strict=True))
        )
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="actcache.extraction.examples"):
        plan = make_plan(_config(tiny_models, cut, str(store), positions="last", token_column="input_ids"))
    assert plan.urls == [url] and not plan.has_missing and "truncated" not in caplog.text
    assert json.loads((Path(url) / "manifest.json").read_text())["examples"]["truncated"] == truncated


def test_rm_takes_the_sets_entries_with_it(tiny_models, inputs, tmp_path, capsys):
    text, ids = inputs
    store = tmp_path / "s"
    (url,) = examples.extract(make_plan(_config(tiny_models, text, str(store), positions="last")))
    column = _config(tiny_models, ids, str(store), positions="last", token_column="input_ids")
    assert len(list((store / "_content").iterdir())) == 2 and make_plan(column, load_model=False).urls == [url]
    assert main(["rm", url, "--yes"]) == 0
    assert not any((store / "_content").iterdir()) and not Path(url).exists()
    assert make_plan(column, load_model=False).sets[0].stored_as is None
