"""The device stage: batches moved to the device in a background thread equal those read in the foreground."""

from __future__ import annotations

import threading

import pytest
from readback import full, rows_of, settled
from torch.utils.data import DataLoader

from actcache.errors import ActcacheError


# -- device stage ---------------------------------------------------------------------------------------
def test_device_stage_yields_the_same_batches_from_a_background_thread(synthetic):
    """device= runs the batch making and the copy in a thread (on CUDA, with a stream of its own: untested here)."""
    before = set(threading.enumerate())  # an earlier test's threads in this worker are not this reader's
    want = rows_of(full(synthetic, batch_size=16, shuffle_buffer=40, seed=4))
    ds = full(synthetic, batch_size=16, shuffle_buffer=40, seed=4, device="cpu")
    assert rows_of(ds) == want
    it = iter(ds)
    next(it)
    assert [t for t in threading.enumerate() if t.name == "actcache-background"]
    it.close()  # stopping early ends the stage's thread, and the reading threads
    assert not settled(before=before), [t.name for t in settled(before=before)]
    with pytest.raises(ActcacheError, match="device= and pin_memory= work with num_workers=0"):
        list(DataLoader(ds, batch_size=None, num_workers=1))


def test_batches_bound_for_a_gpu_are_made_in_pinned_memory(synthetic, monkeypatch):
    """device="cuda" makes its batches as pin_memory=True does (the copies are asynchronous only from pinned memory);
    checked without a GPU by what the dataset asks of torch: bench/gpu_check.py runs it on one."""
    import torch

    from actcache.read import batches, dataset

    monkeypatch.setattr(dataset, "_device", lambda d: torch.device("cuda"))
    ds = full(synthetic, batch_size=16, device="cuda")
    assert ds.pin_memory
    asked = []
    monkeypatch.setattr(
        batches.torch, "empty", lambda *a, pin_memory=False, **k: asked.append(pin_memory) or torch.zeros(*a, **k)
    )
    ds._new_batch(4)
    assert asked and all(asked)
    assert not full(synthetic, batch_size=16).pin_memory
