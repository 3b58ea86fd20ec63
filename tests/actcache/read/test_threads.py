"""The reader's own copies run on one intra-op thread; the caller's thread count is untouched between batches."""

from __future__ import annotations

import threading

import pytest
import torch

from actcache.read import batches, threads
from actcache.read.dataset import ActivationDataset
from actcache.read.threads import one_thread

pytestmark = pytest.mark.skipif(not threads._per_thread(), reason="thread counts are per thread only with OpenMP")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_items_are_made_on_one_thread_and_the_callers_count_is_back_between(two_threads):
    seen = []

    def items():
        for k in range(3):
            seen.append(torch.get_num_threads())
            yield k

    between = [torch.get_num_threads() for _ in one_thread(items())]
    assert seen == [1, 1, 1]
    assert between == [2, 2, 2]
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("shuffle_buffer", [0, 40])
def test_batches_are_assembled_on_one_thread(synthetic, two_threads, monkeypatch, shuffle_buffer):
    counts = []
    new_batch = batches.BatchAssembly._new_batch

    def recorded(self, n):
        counts.append(torch.get_num_threads())
        return new_batch(self, n)

    monkeypatch.setattr(batches.BatchAssembly, "_new_batch", recorded)
    ds = ActivationDataset(synthetic, 16, shuffle_buffer=shuffle_buffer, dtype=torch.float32)
    between = [torch.get_num_threads() for _ in ds]
    assert counts and set(counts) == {1}
    assert set(between) == {2}


def test_closing_early_closes_the_assembly(synthetic):
    """The shuffle buffer goes back to the dataset for the next epoch when an epoch is left early."""
    ds = ActivationDataset(synthetic, 16, shuffle_buffer=40, dtype=torch.float32)
    it = iter(ds)
    next(it)
    assert ds._spare is None
    it.close()  # type: ignore[attr-defined]
    assert ds._spare is not None


def test_an_exception_inside_restores_the_callers_count(two_threads):
    def items():
        yield 0
        raise ValueError("broken shard")

    it = one_thread(items())
    assert next(it) == 0
    with pytest.raises(ValueError, match="broken shard"):
        next(it)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize(
    "options",
    [
        {"dtype": torch.float32},
        {"dtype": torch.float32, "normalize": "standardize"},
        {"dtype": torch.float16, "exclude_tokens": [0], "with_tokens": True},
        {"normalize": "scale", "with_tokens": True, "with_positions": True},
        {"dtype": torch.bfloat16},
    ],
)
def test_two_makers_yield_what_one_does(synthetic, two_threads, monkeypatch, options):
    """Batches gathered by two threads (each on one intra-op thread) equal those the iterating thread makes."""
    counts = []
    gather = batches.BatchAssembly._gather

    def recorded(self, *a):
        counts.append((threading.current_thread().name, torch.get_num_threads()))
        return gather(self, *a)

    monkeypatch.setattr(batches.BatchAssembly, "_gather", recorded)

    def epoch(n):
        ds = ActivationDataset(synthetic, 16, shuffle_buffer=40, seed=2, threads=n, **options)
        return [b if isinstance(b, tuple) else (b,) for b in ds]

    one, two = epoch(1), epoch(2)
    assert len(one) == len(two) > 2
    for a, b in zip(one, two, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    made_by = {name for name, _ in counts[len(one) :]}
    assert made_by and all(n.startswith("actcache-batches") for n in made_by)
    assert {n for _, n in counts} == {1}
    assert torch.get_num_threads() == 2
