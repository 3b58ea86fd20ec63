"""``actcache export``: folders the real ``datasets`` library loads, SAELens's layout, exact values."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from datasets import Array2D, Features, Sequence, Value, load_from_disk

from actcache.cli import app as cli
from actcache.read.reader import Shard, open_set
from actcache.sets import export, shuffle

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def source(extracted_set):
    s = open_set(extracted_set)
    return {
        "url": extracted_set,
        "acts": torch.cat([sh.activations for sh in s]),
        "tokens": torch.cat([sh.tokens for sh in s]),
        "manifest": s.manifest,
    }


def test_saelens_folder_is_what_cache_activations_runner_writes(source, tmp_path, capsys):
    out = tmp_path / "sl"
    assert cli.main(["export", source["url"], str(out), "--format", "saelens"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    ds = load_from_disk(str(out))
    assert ds.features == Features(
        {HOOK: Array2D(shape=(32, 32), dtype="float16"), "token_ids": Sequence(Value(dtype="int32"), length=32)}
    )
    assert len(ds) == 14
    got = ds.with_format("numpy")[:]
    assert np.array_equal(got[HOOK], source["acts"].numpy())  # stored as float16 (features), read as float32
    assert np.array_equal(got["token_ids"], source["tokens"].numpy())
    # SAELens's consolidated layout: flat arrow files named by position, state.json with a fingerprint.
    assert sorted(p.name for p in out.iterdir()) == [
        "actcache.json",
        *[f"data-{i:05d}-of-00004.arrow" for i in range(4)],
        "dataset_info.json",
        "state.json",
    ]
    state = json.loads((out / "state.json").read_text())
    assert state["_fingerprint"] and state["_split"] is None and state["_format_type"] is None
    meta = json.loads((out / "actcache.json").read_text())
    assert meta["set_id"] == Path(source["url"]).name and meta["manifest"]["hook"] == HOOK
    assert not out.with_name("sl.partial").exists()


def test_hf_folder_has_one_row_per_token(source, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "_PIECE_BYTES", 64 * 40)  # pieces of 40 rows: many arrow files, same rows
    bos = source["manifest"]["tokenization"]["bos_id"]
    r = export.export_set(source["url"], str(tmp_path / "hf"), format="hf", exclude_special=True)
    flat_t = source["tokens"].reshape(-1)
    keep = flat_t != bos
    assert (r.rows, r.excluded_tokens, r.dtype) == (int(keep.sum()), int((~keep).sum()), "float16")
    ds = load_from_disk(str(tmp_path / "hf"))
    assert ds.features == Features(
        {
            "activations": Sequence(Value("float16"), length=32),
            "token_id": Value("int32"),
            "sequence": Value("int64"),
            "position": Value("int32"),
        }
    )
    got = ds.with_format("numpy")[:]
    flat_pos = got["sequence"] * 32 + got["position"]
    assert np.array_equal(flat_pos, np.flatnonzero(keep.numpy()))
    assert np.array_equal(got["activations"], source["acts"].reshape(-1, 32)[keep].numpy())
    assert np.array_equal(got["token_id"], flat_t[keep].numpy())
    assert len(list((tmp_path / "hf").glob("data-*.arrow"))) > 4
    torch_rows = ds.with_format("torch")[0:8]["activations"]  # what a trainer gets: [batch, d]
    assert torch_rows.shape == (8, 32)


def test_hf_export_of_a_shuffled_set_keeps_positions(source, tmp_path):
    shuffled = shuffle.shuffle_set(source["url"], out=str(tmp_path / "store"), seed=1, rows_per_shard=100)
    export.export_set(shuffled.url, str(tmp_path / "hf"), format="hf")
    got = load_from_disk(str(tmp_path / "hf")).with_format("numpy")[:]
    flat = got["sequence"] * 32 + got["position"]
    assert sorted(flat.tolist()) == list(range(448)) and not np.array_equal(flat, np.arange(448))
    assert np.array_equal(got["activations"], source["acts"].reshape(-1, 32)[flat].numpy())


def test_bfloat16_is_exported_as_float32():
    acts = torch.randn(2, 4, 8).to(torch.bfloat16)
    pieces, _ = export._pieces(
        "hf", [Shard(0, acts, torch.zeros(2, 4, dtype=torch.int32))], 4, [np.dtype("float32")], (), 0
    )
    assert pieces[0]["acts"][0].dtype == np.float32
    assert np.array_equal(pieces[0]["acts"][0], acts.float().reshape(-1, 8).numpy())


def test_an_interrupted_export_leaves_no_target(source, tmp_path, monkeypatch):
    real = export._dataset
    calls = []

    def failing(*a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(export, "_dataset", failing)
    with pytest.raises(KeyboardInterrupt):
        export.export_set(source["url"], str(tmp_path / "sl"), format="saelens")
    assert sorted(tmp_path.iterdir()) == []  # neither OUT nor a half-written OUT.partial
    monkeypatch.setattr(export, "_dataset", real)
    export.export_set(source["url"], str(tmp_path / "sl"), format="saelens")
    assert len(load_from_disk(str(tmp_path / "sl"))) == 14 and not (tmp_path / "sl.partial").exists()


def test_what_a_killed_export_left_is_replaced(source, tmp_path):
    """A killed export cannot clean up: the next export of the same OUT deletes its OUT.partial (marked as ours)."""
    left = tmp_path / "sl.partial"
    (left / ".tmp_shards").mkdir(parents=True)
    (left / export.MARK).touch()
    (left / "data-00000-of-00001.arrow").write_bytes(b"half")
    export.export_set(source["url"], str(tmp_path / "sl"), format="saelens")
    assert len(load_from_disk(str(tmp_path / "sl"))) == 14 and not left.exists()


@pytest.mark.parametrize("kind", ["folder", "symlink"])
def test_an_out_partial_that_is_not_ours_is_refused_and_kept(source, tmp_path, kind, capsys):
    """A user's folder that happens to be named OUT.partial, or a link there, is neither deleted nor written."""
    elsewhere = tmp_path / "thesis"
    elsewhere.mkdir()
    (elsewhere / "chapter1.tex").write_text("mine")
    partial = tmp_path / "sl.partial"
    if kind == "folder":
        partial.mkdir()
        (partial / "notes.txt").write_text("mine too")
    else:
        partial.symlink_to(elsewhere)
    code = cli.main(["export", source["url"], str(tmp_path / "sl"), "--format", "saelens"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "is not an unfinished export of actcache's" in err[-1]
    assert (elsewhere / "chapter1.tex").read_text() == "mine" and sorted(p.name for p in elsewhere.iterdir()) == [
        "chapter1.tex"
    ]
    if kind == "folder":
        assert sorted(p.name for p in partial.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "sl").exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--exclude-special-tokens"], "SAELens leaves them out itself"),
        (["--exclude-ids", "7,-5"], "token id -5 is outside the vocabulary"),
    ],
)
def test_refusals_are_one_line_and_write_nothing(source, tmp_path, capsys, extra, message):
    out = tmp_path / "x"
    assert cli.main(["export", source["url"], str(out), "--format", "saelens", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not list(tmp_path.iterdir())


def test_an_existing_target_or_a_shuffled_source_is_refused(source, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert cli.main(["export", source["url"], str(tmp_path / "taken"), "--format", "hf"]) == 2
    assert "already exists" in capsys.readouterr().err
    shuffled = shuffle.shuffle_set(source["url"], out=str(tmp_path / "store"), seed=1)
    assert cli.main(["export", shuffled.url, str(tmp_path / "sl"), "--format", "saelens"]) == 2
    assert "SAELens reads whole sequences" in capsys.readouterr().err
    assert (
        cli.main(["export", str(tmp_path / "nope" / Path(source["url"]).name), str(tmp_path / "y"), "--format", "hf"])
        == 2
    )
    assert "no activation set at" in capsys.readouterr().err


def test_hf_folder_loads_with_load_dataset_as_documented(source, tmp_path):
    """datasets.load_dataset refuses a save_to_disk folder by name; docs/training.md gives the call that works."""
    from datasets import load_dataset

    export.export_set(source["url"], str(tmp_path / "hf"), format="hf")
    ds = load_dataset("arrow", data_files=str(tmp_path / "hf" / "*.arrow"), split="train")
    assert len(ds) == len(load_from_disk(str(tmp_path / "hf"))) == source["tokens"].numel()


def test_an_export_into_a_dangling_link_is_refused_in_one_line(source, tmp_path, capsys):
    """A dangling symlink as the output was a raw NotADirectoryError that left OUT.partial and said to rerun; the
    export would otherwise land where the link points. One line (exit 2), nothing written."""
    from actcache.cli import app as cli

    (tmp_path / "out").symlink_to(tmp_path / "elsewhere")
    assert cli.main(["export", source["url"], str(tmp_path / "out"), "--format", "hf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a symlink; export into a new folder" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not (tmp_path / "elsewhere").exists()


def test_an_export_into_the_source_set_is_refused(source, tmp_path, capsys):
    """An export inside the set's folder (spelled directly or through a link) nested a foreign folder in the set,
    which `rm` then refused to remove; refused like cp's and shuffle's destinations, in one line, nothing written."""
    from actcache.cli import app as cli

    set_dir = Path(urlparse(source["url"]).path) if "://" in source["url"] else Path(source["url"])
    before = sorted(p.name for p in set_dir.iterdir())
    (tmp_path / "link").symlink_to(set_dir.parent)
    for out in (set_dir / "exp", tmp_path / "link" / set_dir.name / "shards" / "exp"):
        assert cli.main(["export", source["url"], str(out), "--format", "hf"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "a folder of a store's own layout" in err[0], err
    assert sorted(p.name for p in set_dir.iterdir()) == before


@pytest.mark.parametrize("inside", ["the set", "its shards", "_tokens"])
def test_an_export_inside_a_stores_own_layout_is_refused(source, tmp_path, capsys, inside):
    """An export written into a set's folder or ``_tokens`` mixes with files whose names actcache owns (``rm`` of
    the set then refuses it). One line (exit 2), nothing written."""
    import shutil
    from pathlib import Path

    from actcache.cli import app as cli

    set_dir = shutil.copytree(Path(source["url"]), tmp_path / "store" / Path(source["url"]).name)
    (tmp_path / "store" / "_tokens").mkdir()
    out = {
        "the set": set_dir / "exp",
        "its shards": set_dir / "shards" / "exp",
        "_tokens": set_dir.parent / "_tokens" / "e",
    }
    before = sorted(tmp_path.rglob("*"))
    assert cli.main(["export", str(set_dir), str(out[inside]), "--format", "hf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a folder of a store's own layout" in err[0]
    assert sorted(tmp_path.rglob("*")) == before


# -- several sets into one folder ------------------------------------------------------------------------
def _extracted(model, hook: str, corpus, store: str) -> list[str]:
    """The sets of ``hook`` (comma-separated hooks: one each) of ``model``, 256 tokens in shards of 128."""
    import setwriter

    from actcache.config import ExtractConfig

    return setwriter.extract_sets_by_stages(
        ExtractConfig(
            model=str(model),
            hook=hook,
            dataset=str(corpus),
            context_size=32,
            max_tokens=256,
            shard_tokens=128,
            batch_size=4,
            store=store,
            device="cpu",
        )
    )


@pytest.fixture(scope="module")
def two_hooks(tiny_models, corpus, tmp_path_factory):
    """Two sets of different widths from one forward pass (``--hook a,b``)."""
    return _extracted(
        tiny_models["gpt2"],
        "blocks.0.mlp.hook_post,blocks.1.hook_mlp_out",
        corpus,
        str(tmp_path_factory.mktemp("two-hooks")),
    )


def test_several_sets_export_row_aligned_one_column_per_hook(two_hooks, tmp_path, capsys):
    a, b = two_hooks
    out = tmp_path / "hf"
    assert cli.main(["export", a, b, str(out), "--format", "hf", "--exclude-special-tokens", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(out)
    got = load_from_disk(str(out)).with_format("numpy")[:]
    sa, sb = open_set(a), open_set(b)
    hooks = [sa.manifest["hook"], sb.manifest["hook"]]
    assert set(got) == {*hooks, "token_id", "sequence", "position"}
    flat = got["sequence"] * 32 + got["position"]
    special = {sa.tokenization[k] for k in ("bos_id", "eos_id", "pad_id") if sa.tokenization.get(k) is not None}
    toks = torch.cat([s.tokens.reshape(-1) for s in sa])
    kept = [i for i in range(len(toks)) if int(toks[i]) not in special]
    assert flat.tolist() == kept and len(kept) < len(toks)  # in order, special tokens left out
    assert np.array_equal(got["token_id"], toks[kept].numpy())
    for s, h in zip((sa, sb), hooks, strict=True):  # the same token in the same row of each column
        acts = torch.cat([x.activations.reshape(-1, s.d) for x in s])
        assert np.array_equal(got[h], acts[kept].numpy())
    meta = json.loads((out / "actcache.json").read_text())
    assert [x["column"] for x in meta["sets"]] == hooks and meta["sets"][1]["set_id"] == sb.set_id


def test_several_sets_export_in_saelens_layout(two_hooks, tmp_path):
    a, b = two_hooks
    export.export_set([a, b], str(tmp_path / "sl"), format="saelens")
    ds = load_from_disk(str(tmp_path / "sl"))
    sa, sb = open_set(a), open_set(b)
    assert ds.features[sa.manifest["hook"]] == Array2D(shape=(32, sa.d), dtype=sa.manifest["dtype"])
    assert ds.features[sb.manifest["hook"]] == Array2D(shape=(32, sb.d), dtype=sb.manifest["dtype"])
    got = ds.with_format("numpy")[:]
    for s in (sa, sb):
        assert np.array_equal(got[s.manifest["hook"]], torch.cat([x.activations for x in s]).numpy())
    assert np.array_equal(got["token_ids"], torch.cat([x.tokens for x in sa]).numpy())


def test_sets_of_other_tokens_are_refused_in_one_line(two_hooks, tmp_path, capsys):
    import setwriter

    other = setwriter.write_set(tmp_path / "other", shards=2, seqs=4, ctx=32, d=8)  # other tokens
    out = tmp_path / "hf"
    assert cli.main(["export", two_hooks[0], other, str(out), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "extracted from other tokens than" in err
    assert not out.exists() and not out.with_name("hf.partial").exists()


@pytest.fixture(scope="module")
def two_models(tiny_models, corpus, tmp_path_factory):
    """The same hook of a model and of a perturbed copy of it (a base and its fine-tune, for a crosscoder)."""
    import shutil

    from transformers import AutoModelForCausalLM

    tuned = tmp_path_factory.mktemp("tuned") / "model"
    shutil.copytree(tiny_models["gpt2"], tuned)
    m = AutoModelForCausalLM.from_pretrained(tuned)
    with torch.no_grad():
        for w in m.parameters():
            w.add_(0.01 * torch.randn_like(w, generator=torch.Generator().manual_seed(0)))
    m.save_pretrained(tuned)
    store = str(tmp_path_factory.mktemp("two-models"))
    return [_extracted(model, "blocks.1.hook_resid_post", corpus, store)[0] for model in (tiny_models["gpt2"], tuned)]


@pytest.mark.parametrize("fmt", ["hf", "saelens"])
def test_the_same_hook_of_two_models_exports_one_column_per_set(two_models, tmp_path, fmt):
    """Base vs fine-tune: the same hook twice, each column named after its set's place (HOOK#0, HOOK#1), and
    actcache.json names each column's set and model."""
    base, tuned = two_models
    out = tmp_path / fmt
    export.export_set([base, tuned], str(out), format=fmt)
    got = load_from_disk(str(out)).with_format("numpy")[:]
    hook = "blocks.1.hook_resid_post"
    for k, url in enumerate((base, tuned)):
        s = open_set(url)
        acts = torch.cat([x.activations for x in s])
        want = acts.numpy() if fmt == "saelens" else acts.reshape(-1, s.d).numpy()
        assert np.array_equal(got[f"{hook}#{k}"], want)
    assert not np.array_equal(got[f"{hook}#0"], got[f"{hook}#1"])
    meta = json.loads((out / "actcache.json").read_text())["sets"]
    assert [(x["column"], x["set_id"]) for x in meta] == [
        (f"{hook}#0", base.rsplit("/", 1)[1]),
        (f"{hook}#1", tuned.rsplit("/", 1)[1]),
    ]
    assert meta[1]["model"] != meta[0]["model"]


@pytest.fixture(scope="module")
def example_sets(tiny_models, tmp_path_factory) -> dict[str, str]:
    """Example sets (--packing none) of rows whose columns derive from the dataset row, last and all."""
    from actcache.config import ExtractConfig
    from actcache.extraction import examples
    from actcache.extraction.plan import make_plan
    from actcache.inputs import demo

    root = tmp_path_factory.mktemp("examples")
    data = root / "rows.jsonl"
    lines = demo.corpus_lines()[:17]
    rows = [
        {"text": " ".join(t.split()[: 3 + i * 2]), "row": i, "name": f"s{i}", "odd": i % 2 == 1}
        for i, t in enumerate(lines)
    ]
    rows[3]["text"] = ""  # skipped: the dataset rows after it keep their numbers
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = {}
    for positions in ("last", "all"):
        cfg = ExtractConfig(
            model=str(tiny_models["gpt2"]), dataset=str(data), store=str(root / "store"), device="cpu",
            context_size=32, max_tokens=1 << 12, shard_tokens=5 * 32, dtype="float32", packing="none",
            hook=HOOK, positions=positions, keep_columns="row,name,odd",
        )  # fmt: skip
        (out[positions],) = examples.extract(make_plan(cfg))
    return out


@pytest.mark.parametrize("positions", ["last", "all"])
def test_hf_export_of_an_example_set_carries_its_columns(example_sets, tmp_path, positions):
    from actcache.read.examples import load_examples

    ex = load_examples(example_sets[positions])
    out = tmp_path / "hf"
    assert cli.main(["export", example_sets[positions], str(out), "--format", "hf"]) == 0
    ds = load_from_disk(str(out))
    assert set(ds.features) == {"activations", "example", "example_index", "token_id", "position", "row", "name", "odd"}
    assert ds.features["name"] == Value("string") and ds.features["odd"] == Value("bool")
    got = ds.with_format("numpy")[:]
    j, p = torch.from_numpy(got["example"]), torch.from_numpy(got["position"]).long()
    n = int(ex.lengths.sum()) if positions == "all" else len(ex)
    assert len(ds) == n and torch.equal(torch.from_numpy(got["example_index"]), ex.example_index[j])
    assert torch.equal(torch.from_numpy(got["row"]), ex.columns["row"][j])  # the example's own value on each row
    assert torch.equal(torch.from_numpy(got["row"]), ex.example_index[j])
    assert list(got["name"]) == [ex.columns["name"][i] for i in j.tolist()]
    assert torch.equal(torch.from_numpy(got["odd"]), ex.columns["odd"][j])
    assert torch.equal(torch.from_numpy(got["token_id"]), ex.tokens[j, p])
    if positions == "last":
        assert torch.equal(p, ex.lengths.long() - 1) and torch.equal(j, torch.arange(n))
        assert torch.equal(torch.from_numpy(got["activations"]), ex.activations[:, 0])
    else:
        assert torch.equal(torch.from_numpy(got["activations"]), ex.activations[j, p])


def test_an_example_set_exports_with_hf_only(example_sets, tmp_path, capsys):
    assert cli.main(["export", example_sets["last"], str(tmp_path / "sl"), "--format", "saelens"]) == 2
    err = capsys.readouterr().err.strip()
    assert "one row per example" in err and "--format hf" in err and len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_several_example_sets_are_refused_in_one_line(example_sets, tmp_path, capsys):
    """Several sets export as row-aligned token columns; example sets have no such alignment, so one at a time."""
    out = tmp_path / "hf"
    assert cli.main(["export", example_sets["last"], example_sets["all"], str(out), "--format", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "export one at a time" in err, err
    assert not list(tmp_path.iterdir())


def test_an_output_path_that_is_not_utf8_is_refused_in_one_line(source, tmp_path, capsys):
    """pyarrow takes UTF-8 paths only: a folder named with a stray byte was a raw UnicodeEncodeError after the
    whole export, exit 1 with "rerun the same command", and left OUT.partial. One line (exit 2), nothing written."""
    import os

    from actcache.cli import app as cli

    parent = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9"))
    os.mkdir(parent)
    assert cli.main(["export", source["url"], os.path.join(parent, "out"), "--format", "hf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a UTF-8 path" in err[0]
    assert os.listdir(parent) == []


@pytest.mark.parametrize("out", ["s3://bucket/exp/hf1", "gs://b/x", "hf://datasets/u/r"])
def test_a_url_as_out_is_refused_and_nothing_is_written_locally(source, tmp_path, monkeypatch, capsys, out):
    """As a path, s3://bucket/x is the local folder s3:/bucket/x: where it existed, the export wrote there and
    reported success. An export writes a local folder: a URL is refused in one line."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / out.split("://")[0].join(["", ":"]) / out.split("://")[1].rsplit("/", 1)[0]).mkdir(parents=True)
    before = sorted(p for p in tmp_path.rglob("*"))
    assert cli.main(["export", source["url"], out, "--format", "hf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "export writes a local folder" in err[0] and "URL" in err[0]
    assert sorted(p for p in tmp_path.rglob("*")) == before
