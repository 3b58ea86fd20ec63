"""What a set holds, by an obvious loop over every row: the reference the reader's fast paths are checked against
(import as ``readback``)."""

from __future__ import annotations

import threading

import torch

from actcache.read.dataset import ActivationDataset
from actcache.read.reader import open_set

Row = tuple[bytes, int, int]


def reference(
    url: str, *, drop_bos: bool = False, exclude: tuple[int, ...] = (), world_size: int = 1
) -> list[list[Row]]:
    """What each rank reads without shuffling, by an obvious loop over every row: (activation bytes, token id,
    flat position), kept rows in set order, cut into ``world_size`` equal parts, the remainder left out."""
    s = open_set(url)
    rows, base = [], 0
    for shard in s:
        a, t = shard.activations.reshape(-1, s.d), shard.tokens.reshape(-1)
        for i in range(len(t)):
            if (drop_bos and i % s.context_size == 0) or int(t[i]) in exclude:
                continue
            rows.append((a[i].view(torch.uint8).numpy().tobytes(), int(t[i]), base + i))
        base += len(t)
    per = len(rows) // world_size
    return [rows[r * per : (r + 1) * per] for r in range(world_size)]


def rows_of(batches) -> list[Row]:
    out = []
    for acts, tokens, positions in batches:
        assert acts.ndim == 2 and tokens.shape == positions.shape == (len(acts),)
        out += [
            (acts[i].view(torch.uint8).numpy().tobytes(), int(tokens[i]), int(positions[i])) for i in range(len(acts))
        ]
    return out


def full(url: str, **kw) -> ActivationDataset:
    return ActivationDataset(url, with_tokens=True, with_positions=True, **kw)


def settled(prefix: str = "actcache-", before: set[threading.Thread] | None = None) -> list[threading.Thread]:
    """Join the reader's threads until none is left (a stage may start a pool while it winds down). ``before``:
    threads that ran before the reader started (another test's in the same worker process), not waited for."""

    def alive() -> list[threading.Thread]:
        return [
            t
            for t in threading.enumerate()
            if t.name.startswith(prefix) and t.is_alive() and (before is None or t not in before)
        ]

    for _ in range(20):
        left = alive()
        for t in left:
            t.join(timeout=30)
        if not left:
            break
    return alive()
