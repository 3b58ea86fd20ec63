"""``forever``: endless batches, a new epoch (and shuffle) per pass, loud on an empty dataset."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DataLoader

import actcache
from actcache.errors import ActcacheError
from actcache.read.dataset import ActivationDataset


def test_epochs_follow_each_other_reshuffled(extracted_set):
    ds = ActivationDataset(extracted_set, batch_size=64, shuffle_buffer=128, seed=0)
    per_epoch = 448 // 64  # 7 full batches each epoch
    got = list(itertools.islice(actcache.forever(ds), 3 * per_epoch + 1))
    epochs = [torch.cat(got[i * per_epoch : (i + 1) * per_epoch]) for i in range(3)]
    ref = torch.cat([s.activations.reshape(-1, 32) for s in actcache.open_set(extracted_set)]).float()
    for e in epochs:  # every epoch holds every row once
        assert len(e) == 448 and torch.equal(e.float()[:, 0].sort().values, ref[:, 0].sort().values)
    assert not torch.equal(epochs[0], epochs[1])
    assert ds.epoch == 3  # the last batch taken opened a fourth epoch


def test_a_dataloader_is_driven_through_its_dataset(extracted_set):
    ds = ActivationDataset(extracted_set, batch_size=64, shuffle_buffer=128, seed=1)
    loader = DataLoader(ds, batch_size=None, num_workers=0)
    it = actcache.forever(loader, start_epoch=5)
    first = [next(it) for _ in range(7)]
    assert ds.epoch == 5 and len(torch.cat(first)) == 448
    next(it)
    assert ds.epoch == 6


def test_an_empty_epoch_is_an_error_not_a_hang():
    class Empty:
        def set_epoch(self, epoch):
            self.epoch = epoch

        def __iter__(self):
            return iter(())

    with pytest.raises(ActcacheError, match="a whole epoch gave no batch"):
        next(actcache.forever(Empty()))
