"""Shuffled batches made by two threads of the reader's own, each on one intra-op thread, handed out in order.

Gathering random rows out of a shuffle buffer larger than the CPU's caches waits on memory, row after row; a
second thread keeps a second stream of loads in flight (a shuffled epoch of small shards: 25% less time on 2
cores). Each thread makes whole
batches (no parallel region shared between them), so a thread the kernel deschedules on a busy machine delays
its own batch only, never the other's (bench/RESULTS.md, "Small shards read shuffled")."""

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


def count() -> int:
    """Threads for making batches: 2 in the main process where intra-op counts are per thread and 2 CPUs are
    ours; 1 (the iterating thread) in a DataLoader worker, whose processes already run side by side."""
    if get_worker_info() is not None or not threads._per_thread():
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 2 if cpus >= 2 else 1


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

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def __enter__(self) -> Makers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
