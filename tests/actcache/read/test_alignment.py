"""Several sets as one dataset: row-aligned tuples under one shuffle, one set of exclusions and ranks."""

from __future__ import annotations

import json

import pytest
import setwriter
import torch
from torch.utils.data import DataLoader

from actcache.errors import ActcacheError
from actcache.read.dataset import ActivationDataset
from actcache.read.reader import open_set
from actcache.sets.shuffle import shuffle_set

CTX = 32  # the context of the session's local_set (conftest.py)


# -- several hooks as one dataset ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_hooks(tiny_models, corpus, tmp_path_factory):
    """Two sets of different widths from one forward pass (``--hook a,b``): block 0's MLP neurons and block 1's
    MLP output."""
    from actcache.config import ExtractConfig

    return setwriter.extract_sets_by_stages(
        ExtractConfig(
            model=str(tiny_models["gpt2"]),
            hook="blocks.0.mlp.hook_post,blocks.1.hook_mlp_out",
            dataset=str(corpus),
            context_size=CTX,
            max_tokens=640,
            shard_tokens=128,
            batch_size=4,
            store=str(tmp_path_factory.mktemp("two-hooks")),
            device="cpu",
        )
    )


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("rank", [0, 1])
def test_several_sets_yield_row_aligned_tuples(two_hooks, num_workers, rank):
    a, b = two_hooks
    kw = dict(batch_size=48, shuffle_buffer=100, seed=3, exclude_special_tokens=True, drop_bos=True)
    kw |= dict(rank=rank, world_size=2, with_tokens=True, with_positions=True)
    ds = ActivationDataset([a, b], **kw)
    got = list(DataLoader(ds, batch_size=None, num_workers=num_workers))
    assert len(got) == len(ds) > 1
    rows_a, rows_b = by_position(a), by_position(b)
    assert open_set(a).d != 0 and len(rows_a) == len(rows_b)
    n = 0
    for acts_a, acts_b, tokens, positions in got:
        assert len(acts_a) == len(acts_b) == len(tokens) == len(positions)
        for i in range(len(tokens)):
            p, t = int(positions[i]), int(tokens[i])
            assert rows_a[p] == (t, acts_a[i].view(torch.uint8).numpy().tobytes())
            assert rows_b[p] == (t, acts_b[i].view(torch.uint8).numpy().tobytes())  # the same token, same row
        n += len(tokens)
    assert n == ds.rows_per_rank
    # one shuffle for all: each set alone, with the same options, yields the same rows in the same order
    for k, url in enumerate((a, b)):
        alone = list(DataLoader(ActivationDataset(url, **kw), batch_size=None, num_workers=num_workers))
        for mine, theirs in zip(got, alone, strict=True):
            assert torch.equal(mine[k], theirs[0]) and torch.equal(mine[2], theirs[1])


def test_several_sets_normalise_each_with_its_own_statistics(two_hooks):
    ds = ActivationDataset(list(two_hooks), batch_size=64, dtype=torch.float32, normalize="scale", drop_bos=True)
    parts = list(zip(*ds, strict=True))
    assert len(parts) == 2 and len(ds.stats) == 2
    for part, st in zip(parts, ds.stats, strict=True):
        x = torch.cat(part).double()
        assert x.norm(dim=1).mean().item() == pytest.approx(x.shape[1] ** 0.5, rel=0.01)
        assert st["n"] == len(x)


def test_several_sets_must_share_their_tokens(two_hooks, synthetic, tmp_path):
    with pytest.raises(ActcacheError, match=r"extracted from other tokens than .*--hook a,b$"):
        ActivationDataset([two_hooks[0], synthetic], batch_size=8)
    rows = shuffle_set(two_hooks[1], out=str(tmp_path), seed=0).url
    with pytest.raises(ActcacheError, match=r"is a shuffled copy \(layout 'rows'\)"):
        ActivationDataset([two_hooks[0], rows], batch_size=8)
    with pytest.raises(ActcacheError, match=r"needs a set URL"):
        ActivationDataset([], batch_size=8)


def test_shuffled_copies_made_together_read_together(two_hooks, synthetic, tmp_path, capsys):
    from actcache.cli.app import main

    a, b = two_hooks
    assert main(["shuffle", a, b, "--seed", "4", "--out", str(tmp_path), "--shard-rows", "200", "--json"]) == 0
    ra, rb = (s["url"] for s in json.loads(capsys.readouterr().out)["sets"])
    ds = ActivationDataset([ra, rb], batch_size=64, with_tokens=True, with_positions=True, exclude_special_tokens=True)
    rows_a, rows_b = by_position(a), by_position(b)
    n = 0
    for acts_a, acts_b, tokens, positions in ds:
        for i in range(len(tokens)):
            p, t = int(positions[i]), int(tokens[i])
            assert rows_a[p] == (t, acts_a[i].view(torch.uint8).numpy().tobytes())
            assert rows_b[p] == (t, acts_b[i].view(torch.uint8).numpy().tobytes())
        n += len(tokens)
    assert n == ds.n_tokens > 0
    other = shuffle_set(b, out=str(tmp_path / "other"), seed=5, rows_per_shard=200).url
    with pytest.raises(ActcacheError, match=r"other tokens than .*another shuffle"):
        ActivationDataset([ra, other], batch_size=8)
    assert main(["shuffle", a, synthetic, "--out", str(tmp_path / "refused")]) == 2
    assert "other tokens than" in capsys.readouterr().err and not (tmp_path / "refused").exists()


def test_a_list_of_one_set_yields_tuples_of_one(local_set):
    """Code written for several sets (``x, y = batch`` or ``batch[0]``) works with a list of one: a list always
    yields tuples, one tensor per set; a plain URL yields plain tensors."""
    one = next(iter(ActivationDataset([local_set], batch_size=8)))
    plain = next(iter(ActivationDataset(local_set, batch_size=8)))
    assert isinstance(one, tuple) and len(one) == 1 and torch.equal(one[0], plain)


def by_position(url: str) -> dict[int, tuple[int, bytes]]:
    """Each row of a set by its flat position: (token id, activation bytes), by an obvious loop."""
    s, out, base = open_set(url), {}, 0
    for shard in s:
        a, t = shard.activations.reshape(-1, s.d), shard.tokens.reshape(-1)
        for i in range(len(t)):
            out[base + i] = (int(t[i]), a[i].view(torch.uint8).numpy().tobytes())
        base += len(t)
    return out


def test_the_same_tokens_cut_into_other_shards_says_how_to_cut_them_alike(tiny_models, corpus, tmp_path):
    """Two runs of hooks of other widths (without --shard-tokens each sizes its shards by its widest hook), or of
    two models of other widths: the same token stream in other shards. Refused in one line that gives the command
    that re-cuts the set with the larger shards; the set it makes reads with the other."""
    from actcache.config import ExtractConfig

    store = str(tmp_path / "store")

    def extract(hook: str, shard_tokens: int) -> str:
        cfg = ExtractConfig(
            model=str(tiny_models["gpt2"]), hook=hook, dataset=str(corpus), context_size=CTX, max_tokens=640,
            shard_tokens=shard_tokens, batch_size=4, store=store, device="cpu",
        )  # fmt: skip
        (url,) = setwriter.extract_sets_by_stages(cfg)
        return url

    narrow, wide = extract("blocks.1.hook_mlp_out", 256), extract("blocks.0.mlp.hook_post", 128)
    with pytest.raises(ActcacheError) as e:
        ActivationDataset([narrow, wide], batch_size=8)
    message = str(e.value)
    assert "\n" not in message and "the same tokens, cut into shards of 256 and 128" in message
    assert f"`actcache extract --like {narrow} --store {store} --shard-tokens 128`" in message
    recut = extract("blocks.1.hook_mlp_out", 128)  # what that command extracts
    a, b, tokens = next(iter(ActivationDataset([recut, wide], batch_size=64, with_tokens=True)))
    assert a.shape == (64, 32) and b.shape == (64, 128) and len(tokens) == 64
    other = setwriter.write_set(tmp_path / "synthetic", shards=5, seqs=4, ctx=CTX, d=8)
    with pytest.raises(ActcacheError, match=r"from other tokens than .*: another dataset .*another tokenizer"):
        ActivationDataset([narrow, other], batch_size=8)
