"""Batches made by threads of the reader's own, each on one intra-op thread, handed out in order.

Gathering random rows out of a shuffle buffer larger than the CPU's caches waits on memory, row after row; each
further thread keeps another stream of loads in flight (a shuffled epoch of small shards: 25% less time with 2
threads than 1 on 2 cores). In order, where they are used only when asked for (``threads=``), a cast on one
thread runs at about half the speed of torch's own two-thread copy (61 MB shards: 15-25% less time with 2 threads
than 1 on 2 cores). Each thread makes whole batches (no parallel region shared between them), so a thread the
kernel deschedules on a busy machine delays its own batch only, never the others' (bench/RESULTS.md, "Small
shards read shuffled")."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from itertools import islice
from typing import Any

import torch
from torch.utils.data import get_worker_info

from actcache.read import threads

MOST = 8
"""Threads a dataset makes batches with by default, at most: a bound chosen, not yet measured (only 2 CPUs were
at hand): the gathers end up sharing the memory bus rather than adding loads in flight, and a GPU node's cores
are shared by its ranks."""


def count(asked: int | None = None) -> int:
    """Threads for making batches: ``asked`` if given; else as many as the CPUs this process may use and torch's
    intra-op count allow (at least 2 where there are 2 CPUs, whatever that count: a launcher's
    ``OMP_NUM_THREADS=1`` means one thread per parallel region, not a reader of one stream), at most ``MOST``;
    1 (the iterating thread) in a DataLoader worker, whose processes already run side by side, and where
    intra-op counts are not per thread (a maker could not keep to one)."""
    if not threads._per_thread():
        return 1
    if asked is not None:
        return asked
    if get_worker_info() is not None:
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MOST, cpus, max(2, torch.get_num_threads())))


def _one_intra_op_thread() -> None:
    torch.zeros(1).add_(1)  # torch sets a new thread's count from the process's on first use: let it, then ours
    torch.set_num_threads(1)


class Makers:
    """``n`` threads that make batches (``n == 1``: the caller's own thread, nothing started)."""

    def __init__(self, n: int):
        self.n = n
        self.pool = (
            ThreadPoolExecutor(n, thread_name_prefix="actcache-batches", initializer=_one_intra_op_thread)
            if n > 1
            else None
        )

    def run(self, make: Callable[[Any], Any], jobs: Iterable[Any]) -> Iterator[Any]:
        """``make(job)`` for each job, in order, at most ``n`` being made ahead of the one handed out. When this
        ends early, no job is still running once it has returned: they read memory that the caller reuses."""
        if self.pool is None:
            yield from map(make, jobs)
            return
        it = iter(jobs)
        pending: deque[Future] = deque(self.pool.submit(make, job) for job in islice(it, self.n))
        try:
            while pending:
                done = pending.popleft()
                for job in islice(it, 1):
                    pending.append(self.pool.submit(make, job))
                yield done.result()
        finally:
            for f in pending:
                f.cancel()
            wait(pending)

    def all(self, do: Callable[[Any], None], jobs: list[Any]) -> None:
        """``do(job)`` for every job, side by side, returning once all are done, even when one fails (they write
        memory that the caller reuses); the first job's error is raised then."""
        if self.pool is None or len(jobs) < 2:
            for job in jobs:
                do(job)
            return
        futures = [self.pool.submit(do, job) for job in jobs]
        wait(futures)
        for f in futures:
            f.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def __enter__(self) -> Makers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
