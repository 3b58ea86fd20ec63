"""One sequence per example (--packing none), --positions and --keep-columns: exact against HF run alone."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from actcache.cli.app import main
from actcache.config import ExtractConfig
from actcache.errors import ActcacheError
from actcache.extraction import examples
from actcache.extraction.plan import make_plan
from actcache.inputs import demo
from actcache.read.examples import load_examples

CONTEXT = 32


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """Statements of 1 to 60 words (some longer than the context: truncated) with a label and a source."""
    path = tmp_path_factory.mktemp("labelled") / "statements.jsonl"
    rng = random.Random(0)
    rows = []
    for i, line in enumerate(demo.corpus_lines()[:30]):
        words = line.split()
        rows.append({"text": " ".join(words[: rng.randint(1, 60)]), "label": i % 3 == 0, "source": f"doc{i}"})
        if i == 4:
            rows.append({"text": "", "label": False, "source": "empty"})  # no text: skipped, keeps its row number
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _config(model: Path, dataset: Path, store: Path, **changes) -> ExtractConfig:
    base = dict(
        model=str(model),
        dataset=str(dataset),
        store=str(store),
        device="cpu",
        context_size=CONTEXT,
        max_tokens=1 << 12,
        shard_tokens=10 * CONTEXT,  # 10 examples per shard: several shards
        batch_size=4,
        dtype="float32",
        packing="none",
        hook="blocks.1.hook_resid_post",
    )
    return ExtractConfig(**{**base, **changes})


def _alone(model_dir: Path, ids: list[int], layer: int) -> torch.Tensor:
    """HF's own forward pass of one example: batch of one, no padding, output_hidden_states."""
    from transformers import AutoModel

    hf = _models.get(model_dir)
    if hf is None:
        hf = _models[model_dir] = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = hf(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[layer + 1][0]


_models: dict[Path, object] = {}


def _expected(rows: torch.Tensor, length: int, positions: str) -> torch.Tensor:
    own = rows[1:length]  # BOS is prepended: last, first and mean are over the example's own tokens
    if positions == "last":
        return own[-1:]
    if positions == "mean":
        return own.mean(0, keepdim=True)
    if positions == "first":
        return own[:1]
    if positions == "0,-1,-3:":
        return torch.stack([rows[0], rows[length - 1], *rows[length - 3 : length]])
    raise AssertionError(positions)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
@pytest.mark.parametrize("positions", ["last", "mean", "first", "0,-1,-3:"])
def test_each_example_equals_hf_run_alone(tiny_models, labelled, tmp_path, arch, positions):
    cfg = _config(tiny_models[arch], labelled, tmp_path / "store", positions=positions, keep_columns="label,source")
    (url,) = examples.extract(make_plan(cfg))
    ex = load_examples(url)
    n_rows = {"last": 1, "mean": 1, "first": 1, "0,-1,-3:": 5}[positions]
    assert ex.activations.shape == (30, n_rows, 32)
    assert ex.example_index.tolist() == list(range(5)) + list(range(6, 31))  # row 5 has no text
    assert ex.columns["source"] == [f"doc{i}" for i in range(30)]
    assert ex.columns["label"].dtype == torch.bool and ex.columns["label"].tolist() == [i % 3 == 0 for i in range(30)]
    assert ex.manifest["examples"]["truncated"] > 0  # some statements are longer than the context
    assert int(ex.lengths.max()) == CONTEXT
    for i in range(len(ex)):
        n = int(ex.lengths[i])
        ids = ex.tokens[i, :n].tolist()
        assert not ex.tokens[i, n:].any()
        ref = _alone(tiny_models[arch], ids, layer=1)
        torch.testing.assert_close(ex.activations[i], _expected(ref, n, positions), rtol=1e-4, atol=1e-5)


def test_bridge_engine_masks_padding_too(tiny_models, labelled, tmp_path):
    """A hook of the bridge engine, batched and padded, equals the bridge on each example alone."""
    cfg = _config(tiny_models["llama"], labelled, tmp_path / "store", positions="all", hook="blocks.1.hook_mlp_out")
    plan = make_plan(cfg)
    assert plan.resolved.hooks[cfg.hook].engine == "bridge"
    (url,) = examples.extract(plan)
    ex = load_examples(url)
    assert ex.activations.shape == (30, CONTEXT, 32)
    assert ex.manifest["n_tokens"] == int(ex.lengths.sum()) < 30 * CONTEXT  # only real rows are stored
    step = plan.extractor([cfg.hook])
    for i in range(len(ex)):
        n = int(ex.lengths[i])
        alone = step.capture(ex.tokens[i : i + 1, :n])[cfg.hook][0]
        torch.testing.assert_close(ex.activations[i, :n], alone, rtol=1e-4, atol=1e-5)
        assert not ex.activations[i, n:].any()  # rows past the example's end are stored as zeros


def test_a_last_set_holds_one_row_per_example_and_is_resumed(tiny_models, labelled, tmp_path):
    cfg = _config(tiny_models["gpt2"], labelled, tmp_path / "store", positions="last")
    (url,) = examples.extract(make_plan(cfg))
    m = load_examples(url).manifest
    assert m["n_tokens"] == 30 and m["n_shards"] == 3 and m["complete"]
    stamps = {p: p.stat().st_mtime_ns for p in Path(url).glob("*.safetensors")}
    plan = make_plan(cfg, load_model=False)
    assert not plan.has_missing  # the dataset's end is known: nothing to do on a rerun
    examples.extract(make_plan(cfg))
    assert {p: p.stat().st_mtime_ns for p in Path(url).glob("*.safetensors")} == stamps


def test_truncate_left_keeps_the_end(tiny_models, labelled, tmp_path):
    right = load_examples(examples.extract(make_plan(_config(tiny_models["gpt2"], labelled, tmp_path / "s")))[0])
    left_cfg = _config(tiny_models["gpt2"], labelled, tmp_path / "s", truncate="left")
    left = load_examples(examples.extract(make_plan(left_cfg))[0])
    tok = make_plan(left_cfg, load_model=False).resolved.model.tokenizer
    texts = [json.loads(x)["text"] for x in labelled.read_text().splitlines()]
    texts = [t for t in texts if t]
    for i, t in enumerate(texts):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        n = int(left.lengths[i])
        if len(ids) >= CONTEXT:
            assert left.tokens[i, 1:n].tolist() == ids[-(CONTEXT - 1) :]
            assert right.tokens[i, 1:n].tolist() == ids[: CONTEXT - 1]
        else:
            assert left.tokens[i, 1:n].tolist() == ids == right.tokens[i, 1:n].tolist()


def test_all_positions_on_one_example_per_context_equal_the_packed_rows(tiny_models, tmp_path, prefect_harness):
    """Documents of exactly context-1 tokens: packed with BOS and no separator, each is one sequence."""
    import actcache
    from actcache.read.reader import open_set

    model = tiny_models["neox"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    docs = []
    for line in demo.corpus_lines()[:200]:
        ids = tok(line, add_special_tokens=False)["input_ids"][: CONTEXT - 1]
        text = tok.decode(ids)
        if len(ids) == CONTEXT - 1 and tok(text, add_special_tokens=False)["input_ids"] == ids and "\n" not in text:
            docs.append(text)
        if len(docs) == 12:
            break
    assert len(docs) == 12
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(docs) + "\n")
    common = dict(separator="none", max_tokens=12 * CONTEXT, shard_tokens=4 * CONTEXT)
    packed = open_set(actcache.extract(_config(model, path, tmp_path / "s", packing="concat", **common)))
    apart = load_examples(actcache.extract(_config(model, path, tmp_path / "s", **common)))
    rows = torch.cat([packed.read(r).activations for r in packed.records])
    assert (apart.lengths == CONTEXT).all()
    torch.testing.assert_close(apart.activations, rows.float(), rtol=1e-4, atol=1e-5)


# -- bad input: one line, exit 2, nothing written ---------------------------------------------------------
def _files(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _rows(tmp_path: Path, rows: list[dict]) -> str:
    p = tmp_path / "rows.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(p)


BAD = [
    ("--positions last", None, "--positions last needs one sequence per example: add --packing none"),
    ("--packing none --positions 40", None, "position 40 is out of range for --context-size 32"),
    ("--packing none --positions 2:", None, "does not name a fixed number of positions"),
    ("--packing none --positions lastt", None, "'lastt' is not a position"),
    ("--packing none --keep-columns grade", [{"text": "a b c", "label": 1}], "column 'grade' is missing"),
    ("--packing none --keep-columns label", [{"text": "a b", "label": [1, 2]}], "holds list"),
    ("--packing none --keep-columns label", [{"text": "a b", "label": None}], "holds null"),
    ("--packing none --keep-columns label", [{"text": "a", "label": 1}, {"text": "b", "label": "x"}], "mixes"),
    ("--packing none --positions 0,20", [{"text": "a short one"}], "needs 21 tokens, but dataset row 0 has only"),
    ("--keep-columns label", None, "--keep-columns needs one sequence per example"),
    ("--packing stacked", None, "unsupported --packing 'stacked'"),
]


@pytest.mark.parametrize("flags,rows,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gives_one_line_exit_2_and_writes_nothing(
    tiny_models, corpus, tmp_path, capsys, flags, rows, expected
):
    dataset = _rows(tmp_path, rows) if rows else str(corpus)
    argv = ["extract", "--model", str(tiny_models["gpt2"]), "--dataset", dataset, "--store", str(tmp_path / "store")]
    argv += ["--context-size", "32", "--max-tokens", "512", "--device", "cpu", *flags.split()]
    before = _files(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and expected in err, err
    assert _files(tmp_path) == before
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.safetensors"))


def test_positions_are_part_of_the_key_and_packed_ids_do_not_move(tiny_models, labelled, tmp_path):
    base = _config(tiny_models["gpt2"], labelled, tmp_path / "s", packing="concat")
    packed = make_plan(base, load_model=False).sets[0].set_id
    assert make_plan(base.replace(truncate="left"), load_model=False).sets[0].set_id == packed
    ids = {
        make_plan(base.replace(packing="none", positions=p, keep_columns=k), load_model=False).sets[0].set_id
        for p, k in [("all", ""), ("last", ""), ("-1", ""), ("mean", ""), ("last", "label")]
    }
    assert len(ids) == 5 and packed not in ids
    # one spelling per selection
    a = make_plan(base.replace(packing="none", positions=" 0, -1"), load_model=False).sets[0].set_id
    assert a == make_plan(base.replace(packing="none", positions="0,-1"), load_model=False).sets[0].set_id


def test_a_set_of_examples_is_refused_by_nothing_else_and_packed_sets_by_load_examples(extracted_set):
    with pytest.raises(ActcacheError, match="load_examples reads sets made with --packing none"):
        load_examples(extracted_set)


# -- heads and dimensions ----------------------------------------------------------------------------------
def test_heads_keep_those_heads_of_each_example(tiny_models, labelled, tmp_path):
    hook = "blocks.1.attn.hook_z"
    cfg = _config(tiny_models["llama"], labelled, tmp_path / "store", positions="last", hook=hook, heads="2,0")
    plan = make_plan(cfg)
    n_heads, d_head = plan.resolved.hooks[hook].shape
    (url,) = examples.extract(plan)
    ex = load_examples(url)
    assert ex.activations.shape == (30, 1, 2 * d_head)
    assert ex.manifest["hook_shape"] == [2, d_head] and ex.manifest["selection"]["full_hook_shape"] == [n_heads, d_head]
    step = plan.extractor([hook])
    for i in range(len(ex)):
        n = int(ex.lengths[i])
        alone = step.capture(ex.tokens[i : i + 1, :n])[hook][0, n - 1]  # [n_heads, d_head]
        torch.testing.assert_close(ex.activations[i, 0], alone[[2, 0]].reshape(-1), rtol=1e-4, atol=1e-5)


def test_dims_keep_that_part_of_the_last_axis(tiny_models, labelled, tmp_path):
    cfg = _config(tiny_models["gpt2"], labelled, tmp_path / "store", positions="mean", dims="-4:,0:3,10")
    (url,) = examples.extract(make_plan(cfg))
    ex = load_examples(url)
    keep = [28, 29, 30, 31, 0, 1, 2, 10]
    assert ex.activations.shape == (30, 1, len(keep)) and ex.manifest["d"] == len(keep)
    for i in range(len(ex)):
        n = int(ex.lengths[i])
        ref = _alone(tiny_models["gpt2"], ex.tokens[i, :n].tolist(), layer=1)
        torch.testing.assert_close(ex.activations[i, 0], ref[1:n].mean(0)[keep], rtol=1e-4, atol=1e-5)


SELECT_BAD = [
    ("--heads 0", "--heads needs a hook with a head axis"),
    ("--hook blocks.1.attn.hook_z --heads 0,9", "9 is out of range for the 4 heads"),
    ("--dims 40", "40 is out of range for the last axis"),
    ("--dims 0,0", "names an index twice"),
]


@pytest.mark.parametrize("flags,expected", SELECT_BAD, ids=[b[0] for b in SELECT_BAD])
def test_bad_selection_gives_one_line_and_writes_nothing(tiny_models, corpus, tmp_path, capsys, flags, expected):
    argv = ["extract", "--model", str(tiny_models["gpt2"]), "--dataset", str(corpus), "--store", str(tmp_path / "s")]
    argv += ["--context-size", "32", "--max-tokens", "512", "--device", "cpu", "--packing", "none", *flags.split()]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not any((tmp_path / "s").rglob("*.safetensors"))


# -- pretokenized input ----------------------------------------------------------------------------------
def test_a_token_column_gives_the_activations_of_the_same_text(tiny_models, labelled, tmp_path):
    from transformers import AutoTokenizer

    model = tiny_models["neox"]
    tok = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(x) for x in labelled.read_text().splitlines()]
    pre = tmp_path / "pretokenized.jsonl"
    pre.write_text(
        "\n".join(json.dumps({"input_ids": tok(r["text"], add_special_tokens=False)["input_ids"]}) for r in rows)
    )
    from_text = load_examples(examples.extract(make_plan(_config(model, labelled, tmp_path / "s", positions="-2:")))[0])
    cfg = _config(model, pre, tmp_path / "t", positions="-2:", token_column="input_ids")  # (one store reuses)
    from_ids = load_examples(examples.extract(make_plan(cfg))[0])
    assert torch.equal(from_ids.tokens, from_text.tokens) and torch.equal(
        from_ids.example_index, from_text.example_index
    )
    torch.testing.assert_close(from_ids.activations, from_text.activations, rtol=0, atol=0)


TOKEN_BAD = [
    ([{"input_ids": [1, 2, 99999]}], "token id 99999 in dataset row 0 is outside the model's vocabulary"),
    ([{"input_ids": [1, 2.5]}], "a list with non-integers"),
    ([{"input_ids": "1 2 3"}], "holds str in dataset row 0"),
    ([{"ids": [1, 2]}], "column 'input_ids' is missing"),
]


@pytest.mark.parametrize("rows,expected", TOKEN_BAD, ids=[b[1][:20] for b in TOKEN_BAD])
def test_bad_token_column_gives_one_line_and_writes_nothing(tiny_models, tmp_path, capsys, rows, expected):
    argv = ["extract", "--model", str(tiny_models["gpt2"]), "--dataset", _rows(tmp_path, rows)]
    argv += ["--store", str(tmp_path / "s"), "--context-size", "32", "--max-tokens", "512", "--device", "cpu"]
    argv += ["--packing", "none", "--token-column", "input_ids"]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not any((tmp_path / "s").rglob("*.safetensors"))


def test_the_probe_in_docs_learns_a_label_the_last_token_carries(tiny_models, tmp_path):
    """docs/probing.md's probe, run as written on a set whose label is the statement's last word."""
    rng = random.Random(1)
    words = " ".join(demo.corpus_lines()[:50]).split()
    rows = []
    for i in range(160):
        label = i % 2
        body = " ".join(rng.sample(words, rng.randint(3, 20)))
        rows.append({"text": f"{body} {'yes' if label else 'no'}", "label": label})
    dataset = _rows(tmp_path, rows)
    cfg = _config(tiny_models["gpt2"], Path(dataset), tmp_path / "s", positions="last", keep_columns="label")
    cfg = cfg.replace(truncate="left")  # a long statement keeps its last word
    (url,) = examples.extract(make_plan(cfg))
    doc = (Path(__file__).parents[3] / "docs" / "probing.md").read_text()
    code = doc.split("## A logistic-regression probe")[1].split("```python")[1].split("```")[0]
    scope = {"url": url}
    exec(code.replace("print(", "_ = ("), scope)
    assert float(scope["acc"]) > 0.9
    assert scope["direction"].shape == (32,)


def test_verify_checks_an_example_set_and_readers_of_sequences_point_to_load_examples(tiny_models, labelled, tmp_path):
    from actcache.read.reader import open_set

    cfg = _config(tiny_models["gpt2"], labelled, tmp_path / "s", positions="last", keep_columns="source")
    (url,) = examples.extract(make_plan(cfg))
    s = open_set(url)
    assert s.verify() == []
    with pytest.raises(ActcacheError, match=r"read it with actcache.load_examples\(url\)"):
        s.read(s.records[0])
    shard_path = next(Path(url).glob("shards/*.safetensors"))
    data = bytearray(shard_path.read_bytes())
    data[-1] ^= 1  # the last byte belongs to a string column: covered by the shard's checksum too
    shard_path.write_bytes(bytes(data))
    assert any("fails its sha256" in p for p in open_set(url).verify())
    with pytest.raises(ActcacheError, match="fails its checksum"):
        load_examples(url)


def test_the_flow_manifest_task_writes_an_example_manifest(tiny_models, labelled, tmp_path):
    """What a fan-out's parent calls after its partitions: the manifest keeps the examples' description."""
    from actcache.tasks.manifest import write_manifest

    cfg = _config(tiny_models["gpt2"], labelled, tmp_path / "s", positions="first", keep_columns="label")
    (url,) = examples.extract(make_plan(cfg))
    before = load_examples(url)
    (Path(url) / "manifest.json").unlink()
    assert write_manifest.fn(make_plan(cfg, load_model=False)) == [url]
    after = load_examples(url)
    assert after.manifest["examples"] == before.manifest["examples"]
    assert torch.equal(after.activations, before.activations)


def test_a_batch_out_of_memory_is_halved_and_redone(tiny_models, labelled, tmp_path, monkeypatch, caplog):
    cfg = _config(tiny_models["gpt2"], labelled, tmp_path / "store", positions="0,-1,-3:", batch_size=8)
    plan = make_plan(cfg)
    ex = examples.prepare(plan, cfg.target_seqs)
    want = examples.compute_shard(plan, [cfg.hook], ex.ids)[cfg.hook]
    real, sizes = plan.extractor, []

    def extractor(hooks):  # the real forward pass, as on a device that fits 2 examples at a time
        step = real(hooks)
        for p in step.parts:
            p.adaptive = True  # (CUDA's setting)
        capture = step.capture

        def small(tokens, mask):
            sizes.append(len(tokens))
            if len(tokens) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return capture(tokens, mask)

        step.capture = small
        return step

    monkeypatch.setattr(type(plan), "extractor", lambda _plan, hooks: extractor(hooks))  # (a frozen dataclass)
    monkeypatch.setattr(examples, "_FITS", {})
    got = examples.compute_shard(plan, [cfg.hook], ex.ids)[cfg.hook]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert sizes[:2] == [8, 4] and sum(s for s in sizes if s <= 2) == len(ex.ids)
    assert "out of memory with 8 examples" in caplog.text
    sizes.clear()  # the next shard of this process starts at the size that fit
    torch.testing.assert_close(examples.compute_shard(plan, [cfg.hook], ex.ids)[cfg.hook], want, rtol=1e-4, atol=1e-5)
    assert max(sizes) == 2 and sum(sizes) == len(ex.ids)
