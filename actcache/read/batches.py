"""Batches out of the pieces a reader loads: in order (a batch may span pieces), or shuffled through one buffer
that rows enter once, as stored, and leave gathered in random order into each batch's own memory, cast and
normalised on the way out, by threads of the reader's own (``makers``), which also share the filling."""

from __future__ import annotations

import contextlib
import math
import mmap
import threading
from collections import deque
from collections.abc import Iterator
from itertools import chain
from typing import Any

import torch
from torch.utils.data import get_worker_info

from actcache.read import example_rows, makers
from actcache.read.chunks import _Chunk
from actcache.read.reader import ActivationSet


class BatchAssembly:
    """The batch-making half of ``ActivationDataset`` (its base class): what the dataset's options say a batch
    holds, and how rows get there. The attributes below are set by ``ActivationDataset.__init__``."""

    sets: list[ActivationSet]
    several: bool
    batch_size: int
    shuffle_buffer: int
    threads: int | None
    pin_memory: bool
    with_tokens: bool
    with_positions: bool
    with_columns: bool
    column_types: dict[str, str]
    _strings: dict[int, dict[str, list[str]]]
    _dtypes: list[torch.dtype]
    _norms: list[Any]
    _spare: dict[str, torch.Tensor] | None

    def _columns(self) -> list[str]:
        extra = (["tokens"] if self.with_tokens else []) + (["positions"] if self.with_positions else [])
        kept = [f"column.{k}" for k in self.column_types] if self.with_columns else []
        return self._acts() + extra + kept

    def _column_dtypes(self) -> dict[str, torch.dtype]:
        """The dtype of every column but the activations."""
        out = {"tokens": torch.int32, "positions": torch.int64}
        out.update({f"column.{k}": example_rows.column_dtype(t) for k, t in self.column_types.items()})
        return out

    def _acts(self) -> list[str]:
        """The activation columns: ``acts`` for the first set, ``acts1``, ``acts2``, ... for the others."""
        return ["acts"] + [f"acts{k}" for k in range(1, len(self.sets))]

    def _new_batch(self, n: int) -> dict[str, torch.Tensor]:
        out = {c: self._empty((n, x.d), dt) for c, x, dt in zip(self._acts(), self.sets, self._dtypes, strict=True)}
        dtypes = self._column_dtypes()
        for c in self._columns()[len(self.sets) :]:
            out[c] = self._empty((n,), dtypes[c])
        return out

    def _empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Memory for a batch: pinned if asked; in a DataLoader worker, shared memory from the start (as the
        DataLoader's own collate does), so that handing it to the main process copies nothing."""
        if get_worker_info() is None:
            return torch.empty(shape, dtype=dtype, pin_memory=self.pin_memory)
        storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)  # type: ignore[call-overload]

    def _finish(self, batch: dict[str, torch.Tensor]) -> Any:
        plain = [c for c in self._columns() if not c.startswith("column.")]
        if self.with_columns:
            return (*(batch[c] for c in plain), self._column_values(batch))
        if len(plain) == 1 and not self.several:  # a list of one set still yields tuples, as documented
            return batch["acts"]
        return tuple(batch[c] for c in plain)

    def _column_values(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | list[str]]:
        """The kept columns of a batch: tensors as they are, string codes turned into their text."""
        out: dict[str, torch.Tensor | list[str]] = {}
        mask = (1 << example_rows.STRING_BITS) - 1
        for name, kind in self.column_types.items():
            t = batch[f"column.{name}"]
            if kind == "str":
                out[name] = [self._strings[c >> example_rows.STRING_BITS][name][c & mask] for c in t.tolist()]
            else:
                out[name] = t
        return out

    def _convert(self, k: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        """``dst[:] = src`` (rows of set ``k``) in ``dst``'s dtype, normalised on the way (one pass over the rows)."""
        norm = self._norms[k]
        if norm is None:
            dst.copy_(src)
            return
        factor, offset = norm
        if dst.dtype == factor.dtype:  # float32 batches: cast, then in place (mixed dtypes into out=: 4-6x slower)
            dst.copy_(src)
            dst.mul_(factor)
            if offset is not None:
                dst.add_(offset)
        elif offset is None:  # other batch dtypes: computed in float32, rounded once
            torch.mul(src, factor, out=dst)
        else:
            torch.addcmul(offset, src, factor, out=dst)

    def _direct(self, k: int = 0) -> bool:
        """Whether gathered rows of set ``k`` can land in the batch as they are (no cast, no normalisation)."""
        return self._norms[k] is None and self._dtypes[k] == self.sets[k].dtype

    def _tmps(self, n: int) -> list[torch.Tensor | None]:
        """Per set, room for ``n`` rows gathered before being cast or normalised (None where not needed)."""
        return [None if self._direct(k) else torch.empty((n, x.d), dtype=x.dtype) for k, x in enumerate(self.sets)]

    def _put_all(self, dst: dict[str, torch.Tensor], at: int, c: _Chunk, a: int, b: int, tmps: list) -> None:
        """Rows ``[a, b)`` of piece ``c`` into rows ``at...`` of ``dst``: every set's activations, then the rest."""
        for k, col in enumerate(self._acts()):
            self._put(k, dst[col][at : at + b - a], c, a, b, tmps[k])
        for col in self._columns()[len(self.sets) :]:
            c.copy(c.column(col), a, b, dst[col][at : at + b - a])

    def _put(self, k: int, dst: torch.Tensor, c: _Chunk, a: int, b: int, tmp: torch.Tensor | None) -> None:
        """Rows ``[a, b)`` of set ``k`` in piece ``c`` into ``dst`` (batch rows), cast and normalised, in one pass
        where possible."""
        acts = c.acts[k]
        if self._direct(k):
            c.copy(acts, a, b, dst)
        elif isinstance(c.rows, slice):
            self._convert(k, dst, c.take(acts, a, b))
        else:
            self._convert(k, dst, c.take(acts, a, b, out=tmp[: b - a]))  # type: ignore[index]

    @staticmethod
    def _vouched(chunks: Iterator[_Chunk]) -> Iterator[_Chunk] | None:
        """``chunks`` once its first piece is read (None if there is none): the widths buffers are sized by come
        from the manifest, which anyone can write; a shard whose header agrees with them vouches for them first."""
        first = next(chunks, None)
        return None if first is None else chain([first], chunks)

    def _in_order(self, chunks: Iterator[_Chunk], sizes: list[int], threads: int) -> Iterator[Any]:
        """Batches of the pieces' rows in order; a batch may span pieces (filled in place, never concatenated).
        ``threads`` makers cast and copy whole batches side by side, as shuffled batches are gathered: one thread
        casts at about half the speed of torch's two-thread copy on 2 cores."""
        vouched = self._vouched(chunks)
        if vouched is None:
            return
        scratch = threading.local()  # each maker's staging for pieces with excluded rows
        width = max(sizes, default=0)

        def assemble(job: tuple[dict[str, torch.Tensor], list[tuple[_Chunk, int, int, int]]]) -> Any:
            batch, parts = job
            tmps = getattr(scratch, "tmps", None)
            if tmps is None:
                tmps = scratch.tmps = self._tmps(width)
            for c, a, b, at in parts:
                self._put_all(batch, at, c, a, b, tmps)
            return self._finish(batch)

        with makers.Makers(threads) as team:
            yield from team.run(assemble, self._in_order_jobs(vouched, sizes))

    def _in_order_jobs(
        self, chunks: Iterator[_Chunk], sizes: list[int]
    ) -> Iterator[tuple[dict[str, torch.Tensor], list[tuple[_Chunk, int, int, int]]]]:
        """Each in-order batch: its memory, allocated here in the iterating thread (see ``drain`` below: a maker's
        own arena maps batch-sized blocks afresh), and the rows of each piece that fill it, ``(piece, a, b, at)``.
        A piece is held only by the batches that take rows from it."""
        sizes_left = deque(sizes)
        parts: list[tuple[_Chunk, int, int, int]] = []
        fill = 0
        for c in chunks:
            pos = 0
            while pos < c.n and sizes_left:
                k = min(sizes_left[0] - fill, c.n - pos)
                parts.append((c, pos, pos + k, fill))
                fill, pos = fill + k, pos + k
                if fill == sizes_left[0]:
                    yield self._new_batch(sizes_left.popleft()), parts
                    parts, fill = [], 0
            del c  # the shard's memory goes once its batches are made, not once the next one has arrived

    def _shuffled(
        self, chunks: Iterator[_Chunk], sizes: list[int], rows: int, g: torch.Generator, threads: int
    ) -> Iterator[Any]:
        """Rows go once into a preallocated buffer, as stored (a plain copy); when it is full, batches are gathered
        from it in random order, cast and normalised on the way, by ``threads`` makers. The rows left over that
        would make a partial batch move to the front and are shuffled again with the next fill."""
        cap = min(max(self.shuffle_buffer, self.batch_size), rows)
        vouched = self._vouched(chunks)
        if vouched is None:
            return
        chunks = vouched
        block = self._take_block(cap)
        try:
            with makers.Makers(threads) as team:
                yield from self._shuffle_through(block, cap, chunks, sizes, g, team)
        finally:
            self._spare = block

    def _buffered(self, k: int) -> torch.dtype:
        """The dtype set ``k``'s rows wait in: as stored (filling is a plain copy, half the bytes of float32 for
        float16 sets, and the gathers move half as much), unless batches are narrower: then the batch dtype,
        cast at the fill, so that the buffer is never larger than ``shuffle_buffer`` rows of batches."""
        stored, batch = self.sets[k].dtype, self._dtypes[k]
        return batch if batch.itemsize < stored.itemsize else stored

    def _take_block(self, cap: int) -> dict[str, torch.Tensor]:
        """A shuffle buffer of ``cap`` rows: the previous iterator's when it is free and fits. Writing to fresh
        memory costs page faults (on this project's VMs, more than the copy itself): keep it across epochs."""
        spare, self._spare = self._spare, None  # an iterator running at the same time makes its own
        if spare is not None and len(spare["acts"]) >= cap and set(spare) == set(self._columns()):
            return spare
        block = {
            c: _huge((cap, x.d), self._buffered(k))
            for k, (c, x) in enumerate(zip(self._acts(), self.sets, strict=True))
        }
        dtypes = self._column_dtypes()
        for c in self._columns()[len(self.sets) :]:
            block[c] = torch.empty(cap, dtype=dtypes[c])
        return block

    def _fill(self, block: dict[str, torch.Tensor], at: int, c: _Chunk, a: int, b: int, tmps: list) -> None:
        """Rows ``[a, b)`` of piece ``c`` into rows ``at...`` of the buffer: copied as stored, or cast (and
        normalised) where the buffer holds batches' dtype."""
        for k, col in enumerate(self._acts()):
            dst = block[col][at : at + b - a]
            if dst.dtype == self.sets[k].dtype:
                c.copy(c.acts[k], a, b, dst)
            else:
                self._put(k, dst, c, a, b, tmps[k])
        for col in self._columns()[len(self.sets) :]:
            c.copy(c.column(col), a, b, block[col][at : at + b - a])

    def _fill_shared(
        self, team: makers.Makers, block: dict[str, torch.Tensor], at: int, c: _Chunk, a: int, b: int, tmps: list
    ) -> None:
        """``_fill``, its rows split between the makers (idle while the buffer fills): the buffer must be full
        before the first batch, which draws from every piece, so the filling is the epoch's serial part. Each
        thread copies contiguous rows of its own (and stages them in its own rows of ``tmps``)."""
        row_bytes = sum(block[col].shape[1] * block[col].dtype.itemsize for col in self._acts())
        parts = min(team.n, (b - a) * row_bytes // FILL_SPLIT_MIN) if team.n >= FILL_SHARED_FROM else 1
        if parts < 2:
            self._fill(block, at, c, a, b, tmps)
            return
        cuts = [a + (b - a) * i // parts for i in range(parts + 1)]

        def part(i: int) -> None:
            lo, hi = cuts[i], cuts[i + 1]
            mine = [None if t is None else t[lo - a : hi - a] for t in tmps]
            self._fill(block, at + lo - a, c, lo, hi, mine)

        team.all(part, list(range(parts)))

    def _gather(
        self,
        block: dict[str, torch.Tensor],
        rows: torch.Tensor,
        batch: dict[str, torch.Tensor],
        scratch: threading.local,
    ) -> Any:
        """One batch: ``rows`` of the buffer, in that order, into ``batch`` (cast and normalised from the buffer's
        dtype through a batch-sized scratch of the thread's own, which stays in the CPU's cache)."""
        n = len(rows)
        for k, col in enumerate(self._acts()):
            src = block[col]
            if src.dtype == self._dtypes[k] and (self._norms[k] is None or src.dtype != self.sets[k].dtype):
                torch.index_select(src, 0, rows, out=batch[col])  # ready as buffered
                continue
            have = getattr(scratch, col, None)
            if have is None or len(have) < n:
                have = torch.empty((max(n, self.batch_size), src.shape[1]), dtype=src.dtype)
                setattr(scratch, col, have)
            torch.index_select(src, 0, rows, out=have[:n])
            self._convert(k, batch[col], have[:n])
        for col in self._columns()[len(self.sets) :]:
            torch.index_select(block[col], 0, rows, out=batch[col])
        return self._finish(batch)

    def _shuffle_through(
        self,
        block: dict[str, torch.Tensor],
        cap: int,
        chunks: Iterator[_Chunk],
        sizes: list[int],
        g: torch.Generator,
        team: makers.Makers,
    ) -> Iterator[Any]:
        tmps = [  # staging for rows cast at the fill (where batches are narrower than the stored rows)
            None if block[col].dtype == x.dtype else torch.empty((self.batch_size, x.d), dtype=x.dtype)
            for col, x in zip(self._acts(), self.sets, strict=True)
        ]
        scratch = threading.local()
        sizes_left = deque(sizes)
        fill = 0

        def drain(final: bool) -> Iterator[Any]:
            nonlocal fill
            perm = torch.randperm(fill, generator=g)
            jobs, at = [], 0
            while sizes_left and fill - at >= sizes_left[0]:
                n = sizes_left.popleft()
                jobs.append(perm[at : at + n])
                at += n
            # Each batch's memory comes from this thread: memory a thread of its own allocates comes from an arena of
            # its own, where batch-sized blocks are mapped afresh each time (page faults cost more than the gather).
            made = team.run(
                lambda job: self._gather(block, job[0], job[1], scratch), ((r, self._new_batch(len(r))) for r in jobs)
            )
            yield from made
            rest = perm[at:]
            if not final:  # fewer rows than a batch: to the front, to be shuffled again with the next fill
                for t in block.values():
                    t[: len(rest)] = t[rest]
            fill = len(rest)

        for c in chunks:
            pos = 0
            # Rows cast at the fill out of a piece with excluded rows are staged in ``tmp``, a batch at a time; any
            # other piece goes in with one copy per fill, not one per batch: each copy is a parallel region of its
            # own, and on a loaded machine waiting for its threads cost more than the copying.
            staged = not isinstance(c.rows, slice) and any(
                block[col].dtype != x.dtype for col, x in zip(self._acts(), self.sets, strict=True)
            )
            step = self.batch_size if staged else cap
            while pos < c.n:
                k = min(cap - fill, c.n - pos, step)
                self._fill_shared(team, block, fill, c, pos, pos + k, tmps)
                fill, pos = fill + k, pos + k
                if fill == cap:
                    yield from drain(final=False)
            del c  # the shard's memory goes now, not once the next one has arrived
        if fill:
            yield from drain(final=True)


FILL_SHARED_FROM = 3
"""Makers from which they share the fills. With 2 on 2 CPUs a shared fill was no faster (0.35-0.41 of the floor
against 0.37-0.45 on small shards, 2-8% faster on large ones: bench/RESULTS.md, "Fifth follow-up"): the shard
prefetching thread needs a core too. With more, a fill by one thread would be the epoch's serial part."""

FILL_SPLIT_MIN = 1 << 20
"""Bytes of rows from which each further thread takes a share of a fill (below it, handing work out costs more
than copying)."""

HUGE_MIN = 1 << 22
"""Bytes from which a shuffle buffer is asked for in huge pages (two 2 MiB pages: below that nothing to gain)."""


def _huge(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """Room for a shuffle buffer, in huge pages where the kernel gives them on request (Linux, transparent huge
    pages in "madvise" or "always" mode): batches are gathered from random rows all over the buffer, and with 4 KiB
    pages nearly every row costs a TLB miss (the gathers took 20-30% less CPU in huge pages; bench/RESULTS.md)."""
    size = math.prod(shape) * dtype.itemsize
    if size < HUGE_MIN or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # THP off: plain pages, as torch.empty gives
        m.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(m, dtype=dtype).view(shape)  # the tensor keeps the mapping alive
