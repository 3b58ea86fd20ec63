"""Batches made by the reader's own threads come out in order, a bounded number ahead, and none is still being
made once the caller has stopped."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from actcache.read import makers, threads


def test_jobs_come_out_in_order_at_most_n_ahead():
    running, most = 0, 0
    lock = threading.Lock()

    def make(k):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.01 * (k % 3))  # later jobs may finish first
        with lock:
            running -= 1
        return k

    with makers.Makers(2) as team:
        assert list(team.run(make, range(12))) == list(range(12))
    assert most == 2


def test_stopping_early_leaves_no_job_running():
    started, finished = [], []

    def make(k):
        started.append(k)
        time.sleep(0.2)
        finished.append(k)
        return k

    with makers.Makers(2) as team:
        it = team.run(make, range(10))
        assert next(it) == 0
        it.close()  # type: ignore[attr-defined]
        assert sorted(started) == sorted(finished)  # whatever was started has finished
        assert len(started) <= 3  # and nothing more was started


def test_an_error_is_raised_at_its_turn():
    def make(k):
        if k == 3:
            raise ValueError("shard 3 is damaged")
        return k

    with makers.Makers(2) as team:
        it = team.run(make, range(6))
        assert [next(it) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ValueError, match="shard 3"):
            next(it)


def test_one_maker_is_the_callers_own_thread():
    with makers.Makers(1) as team:
        assert team.pool is None
        assert list(team.run(lambda k: threading.current_thread(), range(2))) == [threading.current_thread()] * 2


def test_dataloader_workers_make_their_own_batches(monkeypatch):
    monkeypatch.setattr(makers, "get_worker_info", lambda: object())
    assert makers.count() == 1


@pytest.mark.skipif(not threads._per_thread(), reason="thread counts are per thread only with OpenMP")
def test_each_maker_runs_on_one_intra_op_thread():
    before = torch.get_num_threads()
    with makers.Makers(2) as team:
        counts = list(team.run(lambda k: torch.get_num_threads(), range(4)))
    assert counts == [1] * 4
    assert torch.get_num_threads() == before


@pytest.mark.skipif(not threads._per_thread(), reason="thread counts are per thread only with OpenMP")
@pytest.mark.parametrize(
    "cpus, intra_op, asked, want",
    [
        (1, 1, None, 1),
        (2, 2, None, 2),
        (2, 1, None, 2),  # a launcher's OMP_NUM_THREADS=1: still two streams of loads
        (16, 16, None, makers.MOST),
        (16, 4, None, 4),
        (64, 64, None, makers.MOST),
        (16, 16, 3, 3),  # asked: as asked
        (2, 2, 6, 6),
    ],
)
def test_how_many_threads_make_batches(monkeypatch, cpus, intra_op, asked, want):
    monkeypatch.setattr(makers.os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    monkeypatch.setattr(makers.torch, "get_num_threads", lambda: intra_op)
    assert makers.count(asked) == want


def test_all_jobs_finish_before_an_error_is_raised():
    finished = []

    def do(k):
        if k == 0:
            raise ValueError("piece 0 is damaged")
        time.sleep(0.2)
        finished.append(k)

    with makers.Makers(3) as team:
        with pytest.raises(ValueError, match="piece 0"):
            team.all(do, [0, 1, 2])
        assert sorted(finished) == [1, 2]  # the others wrote their rows before the caller heard of it


@pytest.mark.skipif(not threads._per_thread(), reason="thread counts are per thread only with OpenMP")
def test_a_dataset_counts_the_callers_intra_op_threads(synthetic, monkeypatch):
    """The count is read where the caller's intra-op count is in force, not inside the reader's own copies (which
    run on one intra-op thread)."""
    from actcache.read.dataset import ActivationDataset

    monkeypatch.setattr(makers.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    made = []
    start = makers.Makers.__init__
    monkeypatch.setattr(makers.Makers, "__init__", lambda team, n: (made.append(n), start(team, n))[1])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(5)
        list(ActivationDataset(synthetic, 16, shuffle_buffer=40))
        list(ActivationDataset(synthetic, 16, shuffle_buffer=40, threads=3))
    finally:
        torch.set_num_threads(before)
    assert made == [5, 3]
