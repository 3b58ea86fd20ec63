"""``forever``: an endless stream of batches for trainers that pull ``next(it)`` instead of looping epochs.

    it = actcache.forever(ActivationDataset(url, batch_size=4096, shuffle_buffer=1 << 20))
    for step in range(n_steps):
        acts = next(it)

Each pass over the data is a new epoch: ``set_epoch`` is called before it, so the shuffle differs every epoch
(for a DataLoader, on the dataset it wraps; with ``persistent_workers=True`` the workers must see it too).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from actcache.errors import ActcacheError


def forever(batches: Iterable[Any], *, start_epoch: int = 0) -> Iterator[Any]:
    """Yield from ``batches`` (an ``ActivationDataset``, or a DataLoader over one) epoch after epoch, endlessly."""
    dataset = getattr(batches, "dataset", batches)
    epoch = start_epoch
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        n = 0
        for batch in batches:
            n += 1
            yield batch
        if not n:
            raise ActcacheError(
                "a whole epoch gave no batch (an empty set, or drop_last with fewer rows than "
                "batch_size); forever() would never yield"
            )
        epoch += 1
