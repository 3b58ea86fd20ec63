"""Dealing a set's rows to ranks and DataLoader workers at batch boundaries."""

from __future__ import annotations

from actcache.read.dataset import Piece, deal


def test_deal_splits_ranks_by_rows_and_workers_at_batch_boundaries():
    counts, order = [10, 0, 7, 3], [2, 0, 3, 1]  # 20 rows; an empty shard
    assert deal(counts, order, rank=0, world_size=3, worker=0, num_workers=1, batch_size=4) == [Piece(2, 0, 6)]
    assert deal(counts, order, rank=1, world_size=3, worker=0, num_workers=1, batch_size=4) == [
        Piece(2, 6, 7),
        Piece(0, 0, 5),
    ]
    assert deal(counts, order, rank=2, world_size=3, worker=0, num_workers=1, batch_size=4) == [
        Piece(0, 5, 10),
        Piece(3, 0, 1),
    ]
    # rank 0 of 1 with 2 workers: 5 batches of 4 -> worker 0 takes 2 (8 rows), worker 1 three
    assert deal(counts, order, rank=0, world_size=1, worker=0, num_workers=2, batch_size=4) == [
        Piece(2, 0, 7),
        Piece(0, 0, 1),
    ]
    assert deal(counts, order, rank=0, world_size=1, worker=1, num_workers=2, batch_size=4) == [
        Piece(0, 1, 10),
        Piece(3, 0, 3),
    ]
    assert deal(counts, order, rank=4, world_size=30, worker=0, num_workers=2, batch_size=4) == []
