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
