"""The reader's own copies on one intra-op thread: they are memory-bound, so a second thread gains little, and
each copy is a parallel region whose barrier waits for a thread the kernel has descheduled whenever the machine
is busy (a trainer's own threads, other processes): on 2 loaded cores the shuffled epoch took 5x longer with 2
threads than with 1 (bench/RESULTS.md, "Small shards read shuffled")."""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from typing import TypeVar

import torch

T = TypeVar("T")


@cache
def _per_thread() -> bool:
    """Whether ``torch.set_num_threads`` can be changed and changed back at any time: with OpenMP it sets the
    calling thread's own count; the native backend refuses once parallel work has started."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def one_thread(items: Iterator[T]) -> Iterator[T]:
    """``items``, each produced with one intra-op thread; between items (the caller's code) the caller's count
    is back in force. Closing this closes a generator ``items`` (its ``finally`` clauses run now, not at garbage
    collection)."""
    if not _per_thread():
        yield from items
        return
    try:
        while True:
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                item = next(items)
            except StopIteration:
                return
            finally:
                torch.set_num_threads(before)
            yield item
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()
