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
    want = rows_of(full(synthetic, batch_size=16, shuffle_buffer=40, seed=4))
    ds = full(synthetic, batch_size=16, shuffle_buffer=40, seed=4, device="cpu")
    assert rows_of(ds) == want
    it = iter(ds)
    next(it)
    assert [t for t in threading.enumerate() if t.name == "actcache-background"]
    it.close()  # stopping early ends the stage's thread, and the reading threads
    assert not settled()
    with pytest.raises(ActcacheError, match="device= and pin_memory= work with num_workers=0"):
        list(DataLoader(ds, batch_size=None, num_workers=1))
