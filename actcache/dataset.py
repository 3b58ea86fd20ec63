"""Stream an activation set for training: a PyTorch ``IterableDataset`` of flat ``[batch, d]`` batches.

    ds = ActivationDataset("s3://bucket/sets/<set_id>", batch_size=4096, shuffle_buffer=1 << 20, seed=0)
    loader = DataLoader(ds, batch_size=None, num_workers=2)   # the dataset batches; the loader must not
    for epoch in range(n):
        ds.set_epoch(epoch)
        for acts in loader: ...

Shards are dealt to ranks and DataLoader workers from one seeded permutation, so no token is read twice
in an epoch. Each worker reads its next shards in a background thread while the current one is consumed,
and shuffles rows within a bounded buffer: memory is about two buffers plus ``prefetch + 1`` shards, never
the whole set.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from actcache.errors import ActcacheError
from actcache.reader import open_set
from actcache.records import Record
from actcache.store import StoreRef


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def prefetched(load: Callable[[Any], Any], items: Iterable[Any], depth: int) -> Iterator[Any]:
    """``load(item)`` for each item, computed up to ``depth`` items ahead in a background thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[str, Any]) -> None:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return
            except queue.Full:
                continue

    def work() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                put(("item", load(item)))
        except BaseException as e:  # handed to the consumer, raised there
            put(("error", e))
        put(("end", None))

    thread = threading.Thread(target=work, name="actcache-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()  # the consumer stopped early or failed: let the thread finish its current read and exit
        thread.join(timeout=60)


class ActivationDataset(IterableDataset):
    """Batches of activations (and optionally token ids) from the set at ``url``, local or S3.

    Args:
        url: ``<store>/<set_id>``, e.g. ``./activations/<set_id>`` or ``s3://bucket/prefix/<set_id>``, or the
            set's ``StoreRef`` (which then carries the storage options and credentials block).
        batch_size: rows (token positions) per batch.
        shuffle_buffer: rows held for shuffling; 0 reads shards and rows in order. With a buffer, shard order
            is also shuffled. The same seed, epoch, ranks and workers give the same batches.
        seed: base of every random choice.
        storage_options: fsspec options for the store (e.g. ``{"endpoint_url": ...}``).
        credentials_block: name of a Prefect AwsCredentials block (default: the AWS chain).
        with_tokens: yield ``(activations, token_ids)`` instead of activations alone.
        drop_bos: skip the first position of every sequence when the set was tokenized with a BOS token.
        dtype: convert activations to this dtype (default: the set's storage dtype).
        rank, world_size: this process's share of the shards (default: from torch.distributed when it is
            initialized, else 0 and 1).
        verify: check each shard's sha256 before using it.
        prefetch: shards read ahead per worker.
        drop_last: drop each worker's final incomplete batch.
    """

    def __init__(self, url: str | StoreRef, batch_size: int, shuffle_buffer: int = 0, seed: int = 0, *,
                 storage_options: dict[str, Any] | None = None, credentials_block: str | None = None,
                 with_tokens: bool = False, drop_bos: bool = False, dtype: torch.dtype | None = None,
                 rank: int | None = None, world_size: int | None = None, verify: bool = False,
                 prefetch: int = 2, drop_last: bool = False):
        super().__init__()
        if rank is None and world_size is None and torch.distributed.is_available() \
                and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        rank, world_size = rank or 0, world_size or 1
        if batch_size < 1:
            raise ActcacheError(f"batch_size must be at least 1, got {batch_size}")
        if shuffle_buffer < 0:
            raise ActcacheError(f"shuffle_buffer must be 0 (no shuffling) or a number of rows, got {shuffle_buffer}")
        if not 0 <= rank < world_size:
            raise ActcacheError(f"rank {rank} is outside world_size {world_size}; need 0 <= rank < world_size")
        if prefetch < 1:
            raise ActcacheError(f"prefetch must be at least 1 shard, got {prefetch}")
        self.set = open_set(url, storage_options, credentials_block=credentials_block)
        m = self.set.manifest
        self.d: int = m["d"]
        self.batch_size, self.shuffle_buffer, self.seed = batch_size, shuffle_buffer, seed
        self.with_tokens, self.dtype, self.verify = with_tokens, dtype, verify
        self.rank, self.world_size, self.prefetch, self.drop_last = rank, world_size, prefetch, drop_last
        self.skip = 1 if drop_bos and m.get("tokenization", {}).get("prepend_bos") else 0
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for another epoch (call before iterating, in the main process)."""
        self.epoch = epoch

    @property
    def n_tokens(self) -> int:
        """Rows one epoch yields across all ranks and workers (before ``drop_last``)."""
        ctx = self.set.manifest["key"]["tokens"]["context_size"]
        return sum(r.n_seq for r in self.set.records) * (ctx - self.skip)

    def shards_for(self, worker: int = 0, num_workers: int = 1) -> list[Record]:
        """The shards one worker of one rank reads this epoch (disjoint across all of them)."""
        order = list(self.set.records)
        if self.shuffle_buffer:
            g = torch.Generator().manual_seed(_seed(self.seed, self.epoch, "shards"))  # same on every rank
            order = [order[i] for i in torch.randperm(len(order), generator=g).tolist()]
        slots = self.world_size * num_workers
        return order[self.rank * num_workers + worker :: slots]

    def _rows(self, r: Record) -> tuple[torch.Tensor, torch.Tensor]:
        shard = self.set.read(r, verify=self.verify)
        acts, tokens = shard.activations[:, self.skip :], shard.tokens[:, self.skip :]
        return acts.reshape(-1, self.d), tokens.reshape(-1)

    def _out(self, acts: torch.Tensor, tokens: torch.Tensor):
        # A copy, not a view: a view would keep (and send from a worker) the whole chunk it was cut from.
        acts = acts.to(dtype=self.dtype or acts.dtype, copy=True)
        return (acts, tokens.clone()) if self.with_tokens else acts

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        shards = self.shards_for(worker, num_workers)
        chunks = prefetched(self._rows, shards, self.prefetch)
        if self.shuffle_buffer:
            g = torch.Generator().manual_seed(_seed(self.seed, self.epoch, self.rank, worker))
            chunks = self._mixed(chunks, g)
        yield from self._batches(chunks)

    def _mixed(self, chunks: Iterator[tuple[torch.Tensor, torch.Tensor]], g: torch.Generator):
        """Rows in random order within a buffer: fill to ``shuffle_buffer``, permute, hand out all but half."""
        buf_a = torch.empty(0, self.d, dtype=torch.float32)
        buf_t = torch.empty(0, dtype=torch.int32)
        first = True
        for a, t in chunks:
            if first:
                buf_a, first = buf_a.to(a.dtype), False
            buf_a, buf_t = torch.cat([buf_a, a]), torch.cat([buf_t, t])
            if len(buf_a) >= self.shuffle_buffer:
                perm = torch.randperm(len(buf_a), generator=g)
                keep = min(self.shuffle_buffer // 2, len(buf_a))
                out = perm[: len(perm) - keep]
                yield buf_a[out], buf_t[out]
                rest = perm[len(perm) - keep :]
                buf_a, buf_t = buf_a[rest], buf_t[rest]
        if len(buf_a):
            perm = torch.randperm(len(buf_a), generator=g)
            yield buf_a[perm], buf_t[perm]

    def _batches(self, chunks: Iterator[tuple[torch.Tensor, torch.Tensor]]):
        """Fixed-size batches across chunk boundaries; the remainder last (unless ``drop_last``)."""
        held_a: list[torch.Tensor] = []
        held_t: list[torch.Tensor] = []
        held = 0
        b = self.batch_size
        for a, t in chunks:
            if held:
                a, t = torch.cat([*held_a, a]), torch.cat([*held_t, t])
                held_a, held_t, held = [], [], 0
            n_full = len(a) // b * b
            for i in range(0, n_full, b):
                yield self._out(a[i : i + b], t[i : i + b])
            if n_full < len(a):
                held_a, held_t, held = [a[n_full:]], [t[n_full:]], len(a) - n_full
        if held and not self.drop_last:
            yield self._out(torch.cat(held_a), torch.cat(held_t))
