"""Which rows each rank and DataLoader worker reads in an epoch (``deal``), and the seeds of its shard orders."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of the kept rows of ``set.records[shard]`` (kept: not excluded)."""

    shard: int
    start: int
    stop: int


def deal(
    counts: Sequence[int],
    order: Sequence[int],
    *,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    batch_size: int,
) -> list[Piece]:
    """The pieces of shards one worker of one rank reads in an epoch.

    ``counts[i]``: kept rows of shard i; ``order``: the epoch's shard order. Rank r reads rows
    ``[r * R, (r + 1) * R)`` of the shards laid end to end in that order, ``R = sum(counts) // world_size``
    (the remainder is left out); its workers split that range at multiples of ``batch_size``.
    """
    per_rank = sum(counts) // world_size
    n_batches = -(-per_rank // batch_size)
    first, last = n_batches * worker // num_workers, n_batches * (worker + 1) // num_workers
    lo = rank * per_rank + min(first * batch_size, per_rank)
    hi = rank * per_rank + min(last * batch_size, per_rank)
    pieces, offset = [], 0
    for i in order:
        if offset >= hi:
            break
        a, b = max(lo, offset), min(hi, offset + counts[i])
        if a < b:
            pieces.append(Piece(i, a - offset, b - offset))
        offset += counts[i]
    return pieces
