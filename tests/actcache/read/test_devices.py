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


# -- casts on the device ----------------------------------------------------------------------------------
def test_which_casts_a_gpu_takes_over():
    """Float32 batches of narrower sets, or normalised ones, are cast on a CUDA device; narrower batches (fewer bytes
    to copy once cast) and other devices stay on the host."""
    import torch

    from actcache.read.devices import on_device_casts

    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    norm = (torch.ones(4), None)
    cuda = torch.device("cuda")  # a device object needs no GPU
    got = on_device_casts(
        cuda, [f16, bf16, f32, f32, f16, f32], [f32, f32, f32, f32, bf16, f16], [None] * 3 + [norm] * 3
    )
    assert got == [(f32, None), (f32, None), None, (f32, norm), None, None]
    assert on_device_casts(torch.device("cpu"), [f16], [f32], [norm]) == [None]
    assert on_device_casts(None, [f16], [f32], [None]) == [None]


@pytest.mark.parametrize(
    "dtype, normalize, late",
    [
        ("float32", None, True),
        ("float32", "scale", True),
        ("float32", "standardize", True),
        ("bfloat16", "standardize", False),
        (None, "scale", False),
    ],
)
@pytest.mark.parametrize("shuffle", [0, 40])
def test_batches_cast_on_the_device_equal_those_cast_on_the_host(
    synthetic, monkeypatch, dtype, normalize, late, shuffle
):
    """The device's cast and normalisation give the host's bits: run through the device stage on the CPU (the same
    code a GPU runs; bench/gpu_check.py's reader_device compares on a GPU), the host then making float16 batches."""
    import torch

    from actcache.read import devices

    kw = dict(
        batch_size=16,
        shuffle_buffer=shuffle,
        seed=2,
        normalize=normalize,
        dtype=None if dtype is None else getattr(torch, dtype),
    )
    want = list(full(synthetic, **kw))
    monkeypatch.setattr(devices, "CAST_ON", frozenset({"cpu"}))
    ds = full(synthetic, device="cpu", **kw)
    assert (ds._late[0] is not None) == late
    assert (ds._dtypes[0] == torch.float16 and ds._norms[0] is None) == late  # the host makes them as stored
    made = []
    real = ds._new_batch
    ds._new_batch = lambda n: made.append(real(n)) or made[-1]
    got = list(ds)
    host = torch.float16 if late else want[0][0].dtype
    assert made and all(b["acts"].dtype == host for b in made)
    assert len(got) == len(want)
    for (a, t, p), (wa, wt, wp) in zip(got, want, strict=True):
        assert a.dtype == wa.dtype and torch.equal(a.view(torch.uint8), wa.view(torch.uint8))
        assert torch.equal(t, wt) and torch.equal(p, wp)


def test_several_sets_cast_on_the_device_each_their_own_way(synthetic, tmp_path, monkeypatch):
    """With several sets, each set's tensor of the batch gets its own set's cast and normalisation."""
    import torch

    from actcache.read import devices
    from actcache.read.dataset import ActivationDataset

    kw = dict(batch_size=16, shuffle_buffer=40, seed=1, dtype=torch.float32, normalize="standardize", with_tokens=True)
    want = list(ActivationDataset([synthetic, synthetic], **kw))
    monkeypatch.setattr(devices, "CAST_ON", frozenset({"cpu"}))
    got = list(ActivationDataset([synthetic, synthetic], device="cpu", **kw))
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert len(g) == 3 and all(torch.equal(x, y) for x, y in zip(g, w, strict=True))
