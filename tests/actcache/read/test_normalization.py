"""`normalize="scale"|"standardize"`: the statistics of the rows the dataset yields, with any exclusion."""

from __future__ import annotations

import pytest
import setwriter
import torch
from readback import full, rows_of

from actcache.errors import ActcacheError
from actcache.read.dataset import ActivationDataset
from actcache.read.reader import open_set
from actcache.sets.copy import copy_set
from actcache.sets.shuffle import shuffle_set


# -- normalisation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", ["scale", "standardize"])
@pytest.mark.parametrize("shuffle_buffer", [0, 40])
def test_normalize_with_the_sets_statistics(synthetic, normalize, shuffle_buffer):
    m = open_set(synthetic).manifest
    stats = m["stats"]
    ds = full(synthetic, batch_size=16, shuffle_buffer=shuffle_buffer, dtype=torch.float32, normalize=normalize)
    plain = {p: a for a, _, p in rows_of(full(synthetic, batch_size=16, dtype=torch.float32))}
    got = torch.cat([a for a, _, _ in ds])
    raw = torch.stack([torch.frombuffer(bytearray(plain[int(p)]), dtype=torch.float32) for _, _, ps in ds for p in ps])
    if normalize == "scale":
        want = raw.double() * stats["scale"]
    else:
        want = (raw.double() - torch.tensor(stats["mean"])) / torch.tensor(stats["var"]).sqrt()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    if normalize == "standardize":  # the set's own rows: mean 0 and std 1 per dimension
        torch.testing.assert_close(got.double().mean(0), torch.zeros(8, dtype=torch.float64), atol=1e-4, rtol=0)
        torch.testing.assert_close(
            got.double().std(0, correction=0), torch.ones(8, dtype=torch.float64), atol=1e-4, rtol=0
        )


def test_normalize_without_statistics_says_how_to_get_them(tmp_path):
    old = setwriter.write_set(tmp_path, shards=1, seqs=2, ctx=4, d=4)  # as written before statistics existed
    with pytest.raises(ActcacheError, match=r"has no normalisation statistics; compute them with `actcache stats "):
        ActivationDataset(old, batch_size=8, normalize="scale")


@pytest.fixture(scope="module")
def loud_bos(tmp_path_factory):
    """A set written as extraction writes it (moments per shard and by token group) whose BOS rows are 30 times
    larger than the others, as in real models: statistics over all rows are far from those of the rest."""
    root = tmp_path_factory.mktemp("loud-bos")
    return setwriter.write_set(root, shards=5, seqs=4, ctx=16, d=32, last_seqs=3, with_moments=True, bos_scale=30.0)


EXCLUSIONS = [{}, {"drop_bos": True}, {"exclude_special_tokens": True}, {"exclude_tokens": [setwriter.PAD]}]


@pytest.mark.parametrize("exclusions", EXCLUSIONS, ids=["none", "drop_bos", "special", "pad"])
def test_scale_gives_mean_norm_sqrt_d_over_the_rows_yielded(loud_bos, exclusions):
    x = yielded(loud_bos, normalize="scale", **exclusions)
    d = x.shape[1]
    assert x.double().norm(dim=1).mean().item() == pytest.approx(d**0.5, rel=0.01)


@pytest.mark.parametrize("exclusions", EXCLUSIONS, ids=["none", "drop_bos", "special", "pad"])
def test_standardize_gives_unit_std_per_dimension_over_the_rows_yielded(loud_bos, exclusions):
    x = yielded(loud_bos, normalize="standardize", **exclusions).double()
    torch.testing.assert_close(x.std(0, correction=0), torch.ones(x.shape[1], dtype=torch.float64), atol=0.01, rtol=0)
    torch.testing.assert_close(x.mean(0), torch.zeros(x.shape[1], dtype=torch.float64), atol=0.01, rtol=0)


def test_the_datasets_stats_are_those_of_its_rows(loud_bos, local_set, tmp_path):
    """``ds.stats`` (what ``normalize`` uses) equals moments computed directly from the rows yielded: on the
    synthetic set, on a set written by the extraction's own stages, and on a shuffled copy of it."""
    rows_url = shuffle_set(local_set, out=str(tmp_path), seed=1, rows_per_shard=300).url
    for url in (loud_bos, local_set, rows_url):
        for kw in ({"drop_bos": True}, {"exclude_special_tokens": True, "drop_bos": True}):
            ds = ActivationDataset(url, batch_size=64, dtype=torch.float32, **kw)
            x = torch.cat(list(ds)).double()
            assert ds.stats["n"] == len(x) < open_set(url).manifest["stats"]["n"]
            torch.testing.assert_close(
                torch.tensor(ds.stats["mean"], dtype=torch.float64), x.mean(0), atol=1e-6, rtol=1e-6
            )
            torch.testing.assert_close(
                torch.tensor(ds.stats["var"], dtype=torch.float64), x.var(0, correction=0), atol=1e-6, rtol=1e-5
            )
            assert ds.stats["mean_norm"] == pytest.approx(x.norm(dim=1).mean().item(), rel=1e-6)
    everything = open_set(loud_bos).manifest["stats"]  # what normalize used before: BOS rows weigh in
    assert ActivationDataset(loud_bos, batch_size=8, drop_bos=True).stats["scale"] > 1.5 * everything["scale"]


def test_normalize_with_an_untracked_id_points_to_a_shuffled_copy(loud_bos):
    with pytest.raises(
        ActcacheError, match=r"track only its special tokens \[0, 1, 2\].*actcache shuffle .* --exclude-ids 7"
    ):
        ActivationDataset(loud_bos, batch_size=8, exclude_tokens=[7], normalize="scale")
    assert ActivationDataset(loud_bos, batch_size=8, exclude_tokens=[7]).stats is None  # reading alone works


def test_normalize_with_exclusions_on_an_older_set_points_to_actcache_stats(synthetic, tmp_path):
    from actcache.sets import stats

    old = copy_set(synthetic, str(tmp_path)).url  # stats, but no moments by token group
    with pytest.raises(ActcacheError, match=r"predates moments by token\); add them with `actcache stats "):
        ActivationDataset(old, batch_size=8, drop_bos=True, normalize="scale")
    stats.compute(old)
    x = yielded(old, normalize="scale", drop_bos=True)
    assert x.double().norm(dim=1).mean().item() == pytest.approx(8**0.5, rel=0.01)


def yielded(url: str, **kw) -> torch.Tensor:
    return torch.cat(list(ActivationDataset(url, batch_size=64, shuffle_buffer=100, dtype=torch.float32, **kw)))
