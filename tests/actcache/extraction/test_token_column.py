"""--token-column with packed sequences (--packing concat): the ids pack as the same text's would, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from actcache.cli.app import main
from actcache.config import ExtractConfig
from actcache.extraction.stages import run_sequential
from actcache.format.key import TokensKey
from actcache.inputs import demo
from actcache.read.reader import open_set

CONTEXT = 16


@pytest.fixture(scope="module")
def inputs(tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    """The same 40 documents as text and as the tiny GPT-2's token ids (a row with no text: skipped in both)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    root = tmp_path_factory.mktemp("packcol")
    texts = [" ".join(line.split()[:30]) for line in demo.corpus_lines()[:40]]
    texts[3] = ""
    text, ids = root / "text.jsonl", root / "ids.jsonl"
    text.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    ids.write_text(
        "\n".join(json.dumps({"input_ids": tok(t, add_special_tokens=False)["input_ids"] if t else []}) for t in texts)
    )
    return text, ids


def _config(tiny_models, dataset: Path, store: Path, **changes) -> ExtractConfig:
    base = dict(
        model=str(tiny_models["gpt2"]),
        dataset=str(dataset),
        store=str(store),
        device="cpu",
        context_size=CONTEXT,
        max_tokens=40 * CONTEXT,
        shard_tokens=16 * CONTEXT,  # 16 sequences per shard: several shards, the data's end inside the last
        batch_size=8,
        dtype="float32",
        hook="blocks.1.hook_resid_post",
    )
    return ExtractConfig(**{**base, **changes})


def _read(url: str) -> tuple[torch.Tensor, torch.Tensor]:
    s = open_set(url)
    shards = [s.read(r) for r in sorted(s.records, key=lambda r: r.index)]
    return torch.cat([x.activations for x in shards]), torch.cat([x.tokens for x in shards])


@pytest.mark.parametrize("separator,bos", [("eos", True), ("none", False)])
def test_a_token_column_packs_as_the_same_text_bit_for_bit(tiny_models, inputs, tmp_path, separator, bos):
    text, ids = inputs
    same = dict(separator=separator, prepend_bos=bos)
    (from_text,) = run_sequential(_config(tiny_models, text, tmp_path / "a", **same))
    (from_ids,) = run_sequential(_config(tiny_models, ids, tmp_path / "b", token_column="input_ids", **same))
    acts_t, toks_t = _read(from_text)
    acts_i, toks_i = _read(from_ids)
    assert toks_t.shape[0] > 16  # more than one shard of sequences
    assert torch.equal(toks_i, toks_t)
    assert torch.equal(acts_i, acts_t)
    # The reference: the column's ids, each document followed by the separator, cut into sequences after BOS.
    tok = open_set(from_ids).tokenization
    rows = [json.loads(line)["input_ids"] for line in ids.read_text().splitlines()]
    sep = [tok["separator_id"]] if separator == "eos" else []
    stream = [i for r in rows if r for i in r + sep]
    body = toks_i[:, 1:] if bos else toks_i
    assert body.flatten().tolist() == stream[: body.numel()]
    if bos:
        assert (toks_i[:, 0] == tok["bos_id"]).all()


def test_the_token_column_is_part_of_the_key_and_text_ids_stay(tiny_models, inputs, tmp_path):
    from actcache.extraction.plan import make_plan

    text, ids = inputs
    by_text = make_plan(_config(tiny_models, text, tmp_path / "s"), load_model=False)
    by_ids = make_plan(_config(tiny_models, ids, tmp_path / "s", token_column="input_ids"), load_model=False)
    assert "token_column" not in by_text.tokens_key.to_dict()  # a text set's id is what it always was
    assert by_ids.tokens_key.token_column == "input_ids" and by_ids.tokens_key.packing == "concat"
    assert by_ids.tokens_key.id != TokensKey(**{**by_ids.tokens_key.to_dict(), "token_column": ""}).id


def test_rows_already_packed_stay_the_sequences(tiny_models, tmp_path):
    """docs/probing.md: rows of --context-size ids that open with BOS, with --prepend-bos false --separator none."""
    import random

    rng = random.Random(0)
    rows = [[0] + [rng.randrange(1, 500) for _ in range(CONTEXT - 1)] for _ in range(20)]
    data = tmp_path / "packed.jsonl"
    data.write_text("\n".join(json.dumps({"input_ids": r}) for r in rows))
    cfg = _config(tiny_models, data, tmp_path / "s", token_column="input_ids", prepend_bos=False, separator="none")
    (url,) = run_sequential(cfg)
    assert _read(url)[1].tolist() == rows


def _no_forward(monkeypatch) -> None:
    from actcache.extraction import stages

    def refuse(*a, **k):
        raise AssertionError("a forward pass ran for a set already stored")

    monkeypatch.setattr(stages, "extract", refuse)


@pytest.mark.parametrize("first", ["text", "column"])
def test_the_same_ids_reuse_the_packed_set_from_text_or_column(tiny_models, inputs, tmp_path, monkeypatch, first):
    from actcache import api
    from actcache.extraction.plan import make_plan

    text, ids = inputs
    store = tmp_path / "s"
    by = {
        "text": _config(tiny_models, text, store),
        "column": _config(tiny_models, ids, store, token_column="input_ids"),
    }
    second = by["column" if first == "text" else "text"]
    (url,) = run_sequential(by[first])
    stored = url.rsplit("/", 1)[1]
    requested = make_plan(second, load_model=False)
    assert requested.has_missing  # its own token shards are not stored yet: decided after tokenizing
    _no_forward(monkeypatch)
    assert run_sequential(second) == [url]  # tokenized, then found: nothing computed
    plan = make_plan(second, load_model=False)  # a rerun finds it from the stored token shards, as a plan
    (s,) = plan.sets
    assert s.stored_as == stored and s.set_id != stored and not plan.has_missing
    (result,) = api.extract_sets(second)
    assert (result.set_id, result.url, result.reused, result.requested_id) == (stored, url, True, s.set_id)
    assert result.shards_computed == 0 and result.complete
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith("_")) == [stored]


def test_the_flow_reuses_the_packed_set_after_tokenizing(tiny_models, inputs, tmp_path, prefect_harness, monkeypatch):
    from actcache import api

    text, ids = inputs
    store = tmp_path / "s"
    (first,) = api.extract_sets(_config(tiny_models, text, store))
    _no_forward(monkeypatch)
    (second,) = api.extract_sets(_config(tiny_models, ids, store, token_column="input_ids"))
    assert second.reused and second.set_id == first.set_id and second.shards_computed == 0
    assert second.requested_id != first.set_id and not (store / second.requested_id).exists()
    # Every count describes the set reused and this request: all its shards stored, none computed.
    assert (second.n_shards, second.n_tokens, second.bytes, second.complete) == (
        first.n_shards,
        first.n_tokens,
        first.bytes,
        True,
    )
    assert second.shards_skipped == second.n_shards > 1 and second.tokens_computed == 0


def test_a_partition_reuses_the_set_after_tokenizing(tiny_models, inputs, tmp_path, prefect_harness, monkeypatch):
    """A fan-out's partition run whose column ids are not tokenized yet finds the text set only after its tokenize
    stage: it computes nothing, and writes nothing into the set it reuses (no partial manifest over it) nor under
    its own id; the other partition finds it from the stored token shards, as a plan."""
    from actcache.extraction.plan import make_plan
    from actcache.flows.extract import extract_activations
    from actcache.flows.fanout import extract_fanout

    text, ids = inputs
    store = tmp_path / "s"
    (url,) = run_sequential(_config(tiny_models, text, store))
    other = tmp_path / "o"  # the same set in another store, for the fan-out's parent below
    (url_other,) = run_sequential(_config(tiny_models, text, other))
    stored = Path(url)
    files = {p: p.read_bytes() for p in sorted(stored.rglob("*")) if p.is_file()}
    entries = sorted((store / "_content").iterdir())
    column = _config(tiny_models, ids, store, token_column="input_ids")
    first = make_plan(column, load_model=False)
    assert first.has_missing and first.sets[0].stored_as is None  # not known before tokenizing
    _no_forward(monkeypatch)
    for index in (0, 1):
        state = extract_activations(column, partition_index=index, num_partitions=2, return_state=True)
        assert state.is_completed() and state.result() == [url]
    assert {p: p.read_bytes() for p in sorted(stored.rglob("*")) if p.is_file()} == files
    assert not (store / first.sets[0].set_id).exists()
    assert sorted((store / "_content").iterdir()) == entries
    # The fan-out's parent, which tokenizes for its partitions, finds it there too: it launches none (this
    # deployment does not exist) and its summary says nothing was computed.
    column = column.replace(store=str(other))
    state = extract_fanout(column, num_partitions=2, deployment="no-such/deployment", return_state=True)
    assert state.is_completed() and state.result() == [url_other]
    assert not (other / first.sets[0].set_id).exists()


def test_other_ids_or_more_sequences_are_not_reused_fewer_are(tiny_models, inputs, tmp_path, monkeypatch):
    from actcache.extraction.plan import make_plan

    text, ids = inputs
    store = tmp_path / "s"
    (whole,) = run_sequential(_config(tiny_models, text, store))
    rows = [json.loads(line) for line in ids.read_text().splitlines()]
    rows[0]["input_ids"] = rows[0]["input_ids"][:-1]  # one id fewer: other sequences
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps(r) for r in rows))
    (url,) = run_sequential(_config(tiny_models, other, store, token_column="input_ids"))
    assert (
        make_plan(_config(tiny_models, other, store, token_column="input_ids"), load_model=False).sets[0].stored_as
        is None
    )
    assert url != whole
    # More sequences than a set of the same ids holds: computed alone (that set is another input's, never extended
    # from this one); as many: that set; fewer: that set too (a prefix of it, as the text's own rerun would read).
    _no_forward(monkeypatch)
    fewer = _config(tiny_models, ids, store, token_column="input_ids", max_tokens=20 * CONTEXT)
    assert run_sequential(fewer) == [whole]
    plan = make_plan(fewer, load_model=False)
    assert plan.urls == [whole] and not plan.has_missing and plan.sets[0].stored_as == whole.rsplit("/", 1)[1]
    monkeypatch.undo()
    (more,) = run_sequential(fewer.replace(max_tokens=60 * CONTEXT))
    assert more not in (url, whole) and open_set(more).n_tokens > open_set(whole).n_tokens


GOOD = {"input_ids": [5, 6, 7, 8, 9]}
TOKEN_BAD = [  # the bad row deep in the file (row 50): the plan's first look passes, the tokenize pass finds it
    ({"input_ids": [1, 2, 99999]}, "token id 99999 in dataset row 49 is outside the model's vocabulary"),
    ({"input_ids": [1, 2.5]}, "a list with non-integers in dataset row 49"),
    ({"input_ids": "1 2 3"}, "holds str in dataset row 49"),
    ({"input_ids": -3}, "holds int in dataset row 49"),
    ({"ids": [1, 2]}, "column 'input_ids' is missing"),
]


@pytest.mark.parametrize("row,expected", TOKEN_BAD, ids=[b[1][:20] for b in TOKEN_BAD])
def test_a_bad_token_column_gives_one_line_and_writes_nothing(tiny_models, tmp_path, prefect_console, row, expected):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [GOOD] * 49 + [row] + [GOOD] * 50))
    store = tmp_path / "s"
    argv = ["extract", "--model", str(tiny_models["gpt2"]), "--dataset", str(data), "--store", str(store)]
    argv += ["--context-size", "16", "--max-tokens", "512", "--device", "cpu", "--token-column", "input_ids"]
    code = main(argv)
    err = prefect_console.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("actcache: ")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1 and err.splitlines()[-1] == lines[0], err
    assert expected in lines[0], lines
    assert not store.exists(), "the token cache was written before the column was checked"


def test_a_column_with_no_ids_is_refused_by_the_plan(tiny_models, tmp_path):
    from actcache.errors import ActcacheError
    from actcache.extraction.plan import make_plan

    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [{"input_ids": []}, {"input_ids": None}] * 10))
    with pytest.raises(ActcacheError, match="has no token ids in column 'input_ids'"):
        make_plan(_config(tiny_models, data, tmp_path / "s", token_column="input_ids"), load_model=False)
    assert not (tmp_path / "s").exists()


def test_like_reproduces_a_token_column_set(tiny_models, inputs, tmp_path):
    from actcache.extraction.plan import make_plan
    from actcache.format import manifest
    from actcache.sets.reproduce import settings

    _, ids = inputs
    (url,) = run_sequential(_config(tiny_models, ids, tmp_path / "s", token_column="input_ids"))
    s = open_set(url)
    like = settings(manifest.read(s.store, s.set_id))
    assert like["token_column"] == "input_ids"
    again = ExtractConfig(**{**like, "store": str(tmp_path / "s"), "device": "cpu"})
    assert make_plan(again, load_model=False).sets[0].set_id == s.set_id


def test_an_extended_set_keeps_one_entry_for_what_it_holds(tiny_models, inputs, tmp_path):
    from actcache.format import content

    text, ids = inputs
    store = tmp_path / "s"
    (url,) = run_sequential(_config(tiny_models, text, store, max_tokens=20 * CONTEXT))
    family = f"{json.loads((Path(url) / 'manifest.json').read_text())[content.FAMILY_FIELD]}.json"
    (first,) = [e for e in (store / "_content").iterdir() if e.name != family]
    (longer,) = run_sequential(_config(tiny_models, text, store))  # extended: another content, the same family
    (entry,) = [e for e in (store / "_content").iterdir() if e.name != family]
    assert longer == url and entry != first and (store / "_content" / family).exists()
    m = json.loads((store / url.rsplit("/", 1)[1] / "manifest.json").read_text())
    assert entry.name == f"{m[content.MANIFEST_FIELD]}.json" and family == f"{m[content.FAMILY_FIELD]}.json"


@pytest.fixture(scope="module")
def stripping(tiny_models, tmp_path_factory) -> tuple[Path, Path, Path]:
    """The tiny GPT-2 with a tokenizer that strips the text first (so "   " tokenizes to nothing), and 30 documents
    as text and as its ids, every third a text of spaces: in the column, an empty list of ids."""
    import shutil

    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("strip")
    model = root / "model"
    shutil.copytree(tiny_models["gpt2"], model)
    spec = json.loads((model / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Strip", "strip_left": True, "strip_right": True}
    (model / "tokenizer.json").write_text(json.dumps(spec))
    tok = AutoTokenizer.from_pretrained(model)
    texts = ["   " if i % 3 == 1 else " ".join(line.split()[:12]) for i, line in enumerate(demo.corpus_lines()[:30])]
    assert tok("   ", add_special_tokens=False)["input_ids"] == []
    text, ids = root / "text.jsonl", root / "ids.jsonl"
    text.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    ids.write_text("\n".join(json.dumps({"input_ids": tok(t, add_special_tokens=False)["input_ids"]}) for t in texts))
    return model, text, ids


@pytest.mark.parametrize("packing", ["concat", "none"])
def test_a_text_with_no_token_is_skipped_as_an_empty_id_list(tiny_models, stripping, tmp_path, monkeypatch, packing):
    """Text and column give the same ids for equivalent rows (no separator, no empty example for a row with no
    token), hence the same content: the column reuses the text's set."""
    from actcache.extraction import examples, stages
    from actcache.extraction.plan import make_plan
    from actcache.read.examples import load_examples

    model, text, ids = stripping
    store = tmp_path / "s"
    same = dict(model=str(model), max_tokens=20 * CONTEXT, packing=packing)
    if packing == "none":
        same |= dict(positions="last", max_tokens=15 * CONTEXT)  # 15 examples: rows 0..21 hold them
    (url,) = run_sequential(_config(tiny_models, text, store, **same))
    if packing == "none":
        got = load_examples(url)
        assert len(got.lengths) == 15 and 0 < int(got.lengths.min())
        assert got.example_index.tolist() == [i for i in range(30) if i % 3 != 1][:15]
    else:
        sep = open_set(url).tokenization["separator_id"]
        toks = _read(url)[1].flatten().tolist()
        assert all(not (a == b == sep) for a, b in zip(toks, toks[1:], strict=False))  # never two in a row

    _no_forward(monkeypatch)
    monkeypatch.setattr(examples, "compute_shard", stages.extract)  # (refused too)
    assert run_sequential(_config(tiny_models, ids, store, token_column="input_ids", **same)) == [url]
    assert make_plan(_config(tiny_models, ids, store, token_column="input_ids", **same), load_model=False).urls == [url]
