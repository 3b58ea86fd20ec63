"""ActivationDataset over example sets (--packing none): rows, with_columns, shuffle, ranks and exclusions."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from actcache.config import ExtractConfig
from actcache.errors import ActcacheError
from actcache.extraction import examples
from actcache.extraction.plan import make_plan
from actcache.inputs import demo
from actcache.read.dataset import ActivationDataset
from actcache.read.examples import load_examples

CONTEXT = 32


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory) -> Path:
    """Statements whose columns derive from their dataset row: a misaligned column shows as a wrong value."""
    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    rng = random.Random(1)
    out = []
    for i, line in enumerate(demo.corpus_lines()[:27]):
        text = "" if i == 5 else " ".join(line.split()[: rng.randint(2, 40)])  # row 5: no text, skipped
        out.append({"text": text, "row": i, "name": f"s{i}", "half": i / 2, "odd": i % 2 == 1})
    path.write_text("\n".join(json.dumps(r) for r in out) + "\n")
    return path


@pytest.fixture(scope="module")
def sets(tiny_models, rows_file, tmp_path_factory) -> dict[str, str]:
    store = tmp_path_factory.mktemp("store")
    out = {}
    for positions in ("last", "0,-1", "all", "mean"):
        cfg = ExtractConfig(
            model=str(tiny_models["gpt2"]),
            dataset=str(rows_file),
            store=str(store),
            device="cpu",
            context_size=CONTEXT,
            max_tokens=1 << 12,
            shard_tokens=7 * CONTEXT,  # 7 examples per shard: 4 shards, the last one short
            batch_size=4,
            dtype="float32",
            packing="none",
            hook="blocks.1.hook_resid_post",
            positions=positions,
            keep_columns="row,name,half,odd",
        )
        (out[positions],) = examples.extract(make_plan(cfg))
    return out


def _expected(ex, positions: str, j: int, pos: int) -> torch.Tensor:
    """The row of example ``j`` (load_examples' order) at ``pos`` in its sequence."""
    if positions == "all":
        return ex.activations[j, pos]
    if positions == "last":
        assert pos == int(ex.lengths[j]) - 1
        return ex.activations[j, 0]
    assert pos in (0, int(ex.lengths[j]) - 1)
    return ex.activations[j, 0 if pos == 0 else 1]


def _check(ds: ActivationDataset, ex, positions: str) -> list[int]:
    """Every row of ``ds`` against ``load_examples``; the positions it yielded."""
    of_row = {int(r): j for j, r in enumerate(ex.example_index)}
    seen = []
    for acts, tokens, pos, cols in ds:
        assert len(acts) == len(tokens) == len(pos) == len(cols["row"]) == len(cols["name"]) == len(cols["half"])
        for i in range(len(acts)):
            j, p = divmod(int(pos[i]), CONTEXT)
            r = int(ex.example_index[j])
            assert int(cols["row"][i]) == r and of_row[r] == j
            assert cols["name"][i] == f"s{r}" and float(cols["half"][i]) == r / 2
            assert bool(cols["odd"][i]) == (r % 2 == 1)
            assert int(tokens[i]) == int(ex.tokens[j, p])
            torch.testing.assert_close(acts[i], _expected(ex, positions, j, p), rtol=0, atol=0)
            seen.append(int(pos[i]))
    return seen


@pytest.mark.parametrize("positions", ["last", "0,-1", "all"])
def test_columns_travel_with_their_rows_under_shuffle_and_ranks(sets, positions):
    ex = load_examples(sets[positions])
    rows = int(ex.lengths.sum()) if positions == "all" else len(ex) * (2 if positions == "0,-1" else 1)
    seen = []
    for rank in range(2):
        ds = ActivationDataset(
            sets[positions], batch_size=5, shuffle_buffer=11, seed=3, rank=rank, world_size=2,
            with_tokens=True, with_positions=True, with_columns=True,
        )  # fmt: skip
        assert ds.n_tokens == rows
        seen += _check(ds, ex, positions)
    assert len(seen) == len(set(seen)) == rows // 2 * 2  # every row once, the odd one left out of the epoch


def test_columns_in_order_and_with_exclusions(sets):
    ex = load_examples(sets["all"])
    ds = ActivationDataset(
        sets["all"], batch_size=8, drop_bos=True, exclude_tokens=[int(ex.tokens[0, 1])],
        with_tokens=True, with_positions=True, with_columns=True,
    )  # fmt: skip
    seen = _check(ds, ex, "all")
    left_out = int(ex.lengths.sum()) - ds.n_tokens
    assert len(seen) == ds.n_tokens and left_out > len(ex)  # every BOS and the excluded token's rows are left out
    assert seen == sorted(seen)  # in order: example after example
    assert all(p % CONTEXT != 0 for p in seen)
    assert all(int(ex.tokens[p // CONTEXT, p % CONTEXT]) != int(ex.tokens[0, 1]) for p in seen)


def test_only_acts_and_columns_and_strings_of_a_mean_set(sets):
    ex = load_examples(sets["mean"])
    (acts, cols), *more = list(ActivationDataset(sets["mean"], batch_size=100, with_columns=True))
    assert not more and len(acts) == len(ex)
    assert cols["name"] == [f"s{int(r)}" for r in ex.example_index]
    assert torch.equal(cols["row"], ex.columns["row"]) and torch.equal(acts, ex.activations[:, 0])
    assert list(ActivationDataset(sets["mean"], batch_size=100))[0].shape == acts.shape  # a plain tensor without


def test_bad_asks_of_an_example_set_are_one_line(sets, extracted_set, tiny_models, rows_file, tmp_path):
    with pytest.raises(ActcacheError, match="keeps no columns"):
        ActivationDataset(extracted_set, batch_size=4, with_columns=True)
    with pytest.raises(ActcacheError, match="mean over each example"):
        ActivationDataset(sets["mean"], batch_size=4, with_tokens=True)
    with pytest.raises(ActcacheError, match="mean over each example"):
        ActivationDataset(sets["mean"], batch_size=4, exclude_tokens=[3])


@pytest.mark.parametrize("positions", ["last", "all"])
def test_an_example_set_has_the_stats_of_its_rows_and_standardizes(sets, positions):
    ex = load_examples(sets[positions])
    rows = (
        ex.activations[:, 0]
        if positions == "last"
        else torch.cat([a[:n] for a, n in zip(ex.activations, ex.lengths, strict=True)])
    )
    stats = ex.manifest["stats"]
    assert stats["n"] == len(rows)
    mean, var = (torch.tensor(stats[k], dtype=torch.float64) for k in ("mean", "var"))
    torch.testing.assert_close(mean, rows.double().mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var, rows.double().var(0, correction=0), rtol=1e-4, atol=1e-6)
    (acts, cols), *_ = list(
        ActivationDataset(sets[positions], batch_size=len(rows), normalize="standardize", with_columns=True)
    )
    torch.testing.assert_close(
        acts.double().mean(0), torch.zeros(acts.shape[1], dtype=torch.float64), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        acts.double().std(0, correction=0), torch.ones(acts.shape[1], dtype=torch.float64), atol=1e-3, rtol=0
    )


def test_columns_through_dataloader_workers(sets):
    from torch.utils.data import DataLoader

    ex = load_examples(sets["last"])
    ds = ActivationDataset(sets["last"], batch_size=4, shuffle_buffer=8, with_columns=True)
    rows = []
    for acts, cols in DataLoader(ds, batch_size=None, num_workers=2):
        for a, r, name in zip(acts, cols["row"].tolist(), cols["name"], strict=True):
            j = ex.example_index.tolist().index(r)
            assert name == f"s{r}" and torch.equal(a, ex.activations[j, 0])
            rows.append(r)
    assert sorted(rows) == sorted(ex.example_index.tolist())
