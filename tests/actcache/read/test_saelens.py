"""The SAELens adapter's parts that need no SAELens: its data provider and the metadata naming the set.

Training with SAELens itself runs in a venv of its own (SAELens pins TransformerLens 3): tests/test_trainers.py.
"""

from __future__ import annotations

import sys
from itertools import islice

import pytest
import setwriter
import torch

from actcache.errors import ActcacheError
from actcache.read import saelens
from actcache.read.dataset import ActivationDataset


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return setwriter.write_set(tmp_path_factory.mktemp("sl"), shards=3, seqs=4, ctx=16, d=8, with_stats=True)


def test_importing_the_adapter_imports_no_saelens(synthetic):
    assert "sae_lens" not in sys.modules
    assert saelens.metadata(ActivationDataset(synthetic, batch_size=8))["dataset_path"]
    assert "sae_lens" not in sys.modules


def test_the_provider_yields_every_row_in_float32_then_the_next_epoch(synthetic):
    ds = ActivationDataset(synthetic, batch_size=16, shuffle_buffer=64, seed=1)
    n = ds.n_tokens // 16
    got = list(islice(saelens.data_provider(ds), 2 * n))
    assert all(b.dtype == torch.float32 and b.shape == (16, ds.d) for b in got)
    epoch0 = torch.cat(got[:n])
    every = torch.cat(list(ActivationDataset(synthetic, batch_size=16)), dim=0).float()
    assert sorted(map(tuple, epoch0.tolist())) == sorted(map(tuple, every.tolist()))
    assert not torch.equal(epoch0, torch.cat(got[n:]))  # a new epoch, a new shuffle


def test_the_metadata_names_the_set_and_what_was_left_out(synthetic):
    ds = ActivationDataset(synthetic, batch_size=8, drop_bos=True)
    m = saelens.metadata(ds)
    assert m["dataset_path"] == ds.set.url and m["dataset_path"].endswith(ds.set.set_id)
    assert m["hook_name"] == ds.set.manifest["hook"] and m["context_size"] == 16
    assert m["actcache_set_id"] == ds.set.set_id and m["actcache_drop_bos"] == ds.drop_bos


def test_several_sets_or_extra_columns_are_refused_in_one_line(synthetic):
    both = ActivationDataset([synthetic, synthetic], batch_size=8)
    with pytest.raises(ActcacheError, match="one tensor per batch"):
        next(saelens.data_provider(both))
    with pytest.raises(ActcacheError, match="one tensor per batch"):  # not the first set's metadata alone
        saelens.metadata(both)
    with pytest.raises(ActcacheError, match="one tensor per batch"):  # before SAELens or the statistics
        saelens.train(both, object(), training_tokens=64)
    with pytest.raises(ActcacheError, match="with_tokens"):
        next(saelens.data_provider(ActivationDataset(synthetic, batch_size=8, with_tokens=True)))
