"""Stream an activation set for training: a PyTorch ``IterableDataset`` of flat ``[batch, d]`` batches.

    ds = ActivationDataset("s3://bucket/sets/<set_id>", batch_size=4096, shuffle_buffer=1 << 20, seed=0)
    loader = DataLoader(ds, batch_size=None, num_workers=2)   # the dataset batches; the loader must not
    for epoch in range(n):
        ds.set_epoch(epoch)
        for acts in loader: ...

How one epoch is dealt (``deal``): the set's rows (token positions, less the excluded ones) in shard order
(a new order every epoch when shuffling) are cut into ``world_size`` contiguous parts of exactly
``n_tokens // world_size`` rows, so every rank yields the same number of batches (DDP hangs otherwise); the
last ``n_tokens % world_size`` rows of the epoch are left out. A rank's part is cut into DataLoader workers at
batch boundaries, so the batches a rank yields (how many, and their sizes) do not depend on the workers.

How rows are read: background threads fetch ``prefetch`` shards ahead (a local shard is memory-mapped, its
pages faulted in there; on S3 several GETs are in flight and transient errors retried), the tensors are views
of those bytes, and rows are copied once into a preallocated shuffle buffer as stored, then gathered in random
order into each batch, cast (and normalised) on the way, by threads of the reader's own in the main process
(``threads``: up to 8, the CPUs allowing; one in a DataLoader worker), which also share each fill; in order,
with ``threads`` given, the same threads cast and copy whole batches straight from the pieces. No
``torch.cat``, no per-row Python. Memory: the buffer (``shuffle_buffer`` rows as stored, or in the batch dtype
where that is narrower; per worker, kept for the next epoch) plus ``prefetch + 1`` shards and one batch per
thread being made, whatever the size of the set.
"""

from __future__ import annotations

import atexit
import threading
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from actcache.errors import ActcacheError
from actcache.format import moments
from actcache.format.records import Record
from actcache.read import example_rows, makers
from actcache.read.alignment import check_aligned
from actcache.read.batches import BatchAssembly
from actcache.read.chunks import _Chunk
from actcache.read.dealing import Piece, _seed, deal
from actcache.read.devices import _device, _on_device, on_device_casts
from actcache.read.exclude import token_ids
from actcache.read.normalization import NORMALIZE, _normalizer
from actcache.read.prefetch import RETRY_DELAYS, background, prefetched, retried
from actcache.read.reader import ActivationSet, open_set
from actcache.read.threads import one_thread
from actcache.storage.store import StoreRef

# Re-exported: the reader's helpers were defined here before they had modules of their own.
__all__ = [
    "NORMALIZE",
    "RETRY_DELAYS",
    "ActivationDataset",
    "Piece",
    "background",
    "check_aligned",
    "deal",
    "prefetched",
    "retried",
]

_open: weakref.WeakSet = weakref.WeakSet()
"""Batch iterators not yet finished: closed at interpreter exit (see ``_close_open``)."""


@atexit.register
def _close_open() -> None:
    """Close the batch iterators a program left half-read (a loop that broke off, ``forever``), while the modules
    their clean-up uses still exist: left to the interpreter's last garbage collection, they would run it after
    ``concurrent.futures`` and ``queue`` are torn down and print an ignored ``AttributeError`` at exit."""
    for it in list(_open):
        try:
            it.close()
        except Exception:  # running in another thread, or failing to close: nothing left to report it to
            pass


class ActivationDataset(IterableDataset, BatchAssembly):
    """Batches of activations (and optionally token ids and positions) from the set at ``url``, local or S3.

    Args:
        url: ``<store>/<set_id>``, e.g. ``./activations/<set_id>`` or ``s3://bucket/prefix/<set_id>``, or the
            set's ``StoreRef`` (which then carries the storage options and credentials block). A list of them
            (sets of several hooks extracted from the same tokens, e.g. ``--hook a,b``, or shuffled copies of
            such sets made by one ``actcache shuffle A B``) yields a tuple of row-aligned batches, one per set in
            that order (the same token in the same row of each), under one shuffle, one set of exclusions and one
            set of ranks; ``normalize`` and ``dtype`` apply to each.
        batch_size: rows (token positions) per batch.
        shuffle_buffer: rows held for shuffling (at least one batch); 0 reads shards and rows in order. With a
            buffer, the shard order changes every epoch and rows are emitted in random order one buffer at a
            time: every batch is a uniform sample, without replacement, of the buffer's rows. The same seed,
            epoch, world size, rank and DataLoader workers give the same batches.
        seed: base of every random choice.
        storage_options: fsspec options for the store (e.g. ``{"endpoint_url": ...}``).
        credentials_block: name of a Prefect AwsCredentials block (default: the AWS chain).
        with_tokens: also yield each row's token id (int32).
        with_positions: also yield each row's flat index ``sequence * context_size + position`` (int64) in the
            set (for a ``rows`` set: in the set it was made from): excluded rows leave gaps, nothing shifts.
        drop_bos: skip the first position of every sequence when the set was tokenized with a BOS token.
        exclude_special_tokens: skip rows whose token is BOS, EOS, pad or the separator, as the set's manifest
            records them (sets from before eos/pad were recorded: BOS and separator, with a warning).
        exclude_tokens: skip rows with these token ids too: ints, a list of them, or a 1-d integer numpy
            array or torch tensor. ``excluded`` counts the rows skipped per id.
        dtype: batches in this dtype (default: the set's storage dtype).
        normalize: ``"scale"`` multiplies by the set's ``stats["scale"]`` (``sqrt(d) / mean L2 norm``);
            ``"standardize"`` subtracts the per-dimension mean and divides by the per-dimension std (a
            dimension with zero variance is only centred). Needs the set's statistics (``actcache stats SET``).
        rank, world_size: this process's share (default: from torch.distributed when it is initialized, else
            0 and 1). Every rank gets ``n_tokens // world_size`` rows per epoch; the remainder is left out.
        with_columns: also yield the kept columns (``--keep-columns``) of an example set (``--packing none``): each
            batch is then ``(acts, ..., columns)``, ``columns`` a dict of one value per row (a tensor for numbers
            and bools, a list for strings), each row its example's value. Rows of an example set are its stored
            rows (one per example for last, first and mean); their positions are ``example * context_size +
            position``, the example counted in the set's order (as ``load_examples`` holds them).
        verify: check each shard's sha256 before using it.
        prefetch: shards read ahead (and S3 GETs in flight) per worker.
        drop_last: leave out the rank's final batch when it is not full.
        pin_memory: make batches in pinned host memory (needs CUDA), for fast non-blocking copies to a GPU.
        device: yield batches on this device: made (in pinned memory, as with ``pin_memory=True``) and copied by a
            background thread on its own CUDA stream, two batches ahead, so the copy overlaps training. Float32
            batches of a float16/bfloat16 set cross as stored and are cast and normalised on the GPU (half the
            bytes, and half the host's work; the same bits as on the host). Use with ``num_workers=0``; with DataLoader
            workers use the DataLoader's ``pin_memory=True`` and move batches yourself.
        threads: threads that make batches (and share each buffer fill) in this process (default: as
            many as the CPUs this process may use and ``torch.get_num_threads()`` allow, at least 2 on 2 CPUs, at
            most 8; 1 in a DataLoader worker). Lower it when your training loop needs the CPUs. In order
            (``shuffle_buffer=0``) the default is the iterating thread alone; give ``threads`` for more (large
            shards: faster).
    """

    def __init__(
        self,
        url: str | StoreRef | Sequence[str | StoreRef],
        batch_size: int,
        shuffle_buffer: int = 0,
        seed: int = 0,
        *,
        storage_options: dict[str, Any] | None = None,
        credentials_block: str | None = None,
        with_tokens: bool = False,
        with_positions: bool = False,
        drop_bos: bool = False,
        exclude_special_tokens: bool = False,
        exclude_tokens: Any = (),
        dtype: torch.dtype | None = None,
        normalize: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        with_columns: bool = False,
        verify: bool = False,
        prefetch: int = 2,
        drop_last: bool = False,
        pin_memory: bool = False,
        device: str | torch.device | None = None,
        threads: int | None = None,
    ):
        super().__init__()
        if (
            rank is None
            and world_size is None
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        ):
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        rank, world_size = (0 if rank is None else rank), (1 if world_size is None else world_size)
        if type(batch_size) is not int or batch_size < 1:
            raise ActcacheError(f"batch_size must be a positive integer, got {batch_size!r}")
        if type(shuffle_buffer) is not int or shuffle_buffer < 0:
            raise ActcacheError(f"shuffle_buffer must be 0 (no shuffling) or a number of rows, got {shuffle_buffer!r}")
        if not 0 <= rank < world_size:
            raise ActcacheError(f"rank {rank} is outside world_size {world_size}; need 0 <= rank < world_size")
        if type(prefetch) is not int or prefetch < 1:
            raise ActcacheError(f"prefetch must be at least 1 shard, got {prefetch!r}")
        if threads is not None and (type(threads) is not int or threads < 1):
            raise ActcacheError(f"threads must be a positive number of threads (or None: chosen), got {threads!r}")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ActcacheError(f"dtype must be a torch floating dtype such as torch.float32, got {dtype!r}")
        if normalize is not None and normalize not in NORMALIZE:
            raise ActcacheError(f"normalize must be one of {', '.join(NORMALIZE)} or None, got {normalize!r}")
        self.device = _device(device) if device is not None else None
        if pin_memory and not torch.cuda.is_available():
            raise ActcacheError("pin_memory=True needs a CUDA device, and torch sees none; leave it off")
        self.several = isinstance(url, list | tuple)
        urls: list[str | StoreRef] = list(url) if isinstance(url, list | tuple) else [url]  # type: ignore[list-item]
        if not urls:
            raise ActcacheError("ActivationDataset needs a set URL, or a non-empty list of them")
        self.sets: list[ActivationSet] = [
            open_set(u, storage_options, credentials_block=credentials_block) for u in urls
        ]
        check_aligned(self.sets)
        self.set: ActivationSet = self.sets[0]
        """The (first) set: its tokens, shards and tokenizer drive the dealing and exclusions for all."""
        s = self.set
        self.examples = example_rows.is_examples(s)
        self.with_columns = with_columns
        self.column_types: dict[str, str] = example_rows.column_types(s) if self.examples else {}
        """Kept columns of an example set (name -> int, float, bool or str), yielded when ``with_columns``."""
        if with_columns and not self.column_types:
            raise ActcacheError(
                f"with_columns=True, but set {s.url} keeps no columns (they are kept at extraction by "
                "--packing none --keep-columns NAME,...); leave with_columns off"
            )
        if self.examples:
            drop_bos = drop_bos and s.manifest["examples"].get("positions") != "mean"  # a mean holds no BOS row
        self._first_examples = example_rows.first_examples(s) if self.examples else []
        self._strings: dict[int, dict[str, list[str]]] = {}
        """An example set's string columns, by shard read (see ``example_rows.STRING_BITS``)."""
        self.d: int = s.d
        self.batch_size, self.shuffle_buffer, self.seed = batch_size, shuffle_buffer, seed
        self.threads = threads
        self.with_tokens, self.with_positions, self.verify = with_tokens, with_positions, verify
        self.dtype: torch.dtype = dtype or s.dtype
        self._dtypes: list[torch.dtype] = [dtype or x.dtype for x in self.sets]
        self.rank, self.world_size, self.prefetch, self.drop_last = rank, world_size, prefetch, drop_last
        # Batches bound for a GPU are made in pinned memory: copies from pageable memory are staged by the driver,
        # and a batch the background thread allocates in pageable memory is mapped afresh each time (its own malloc
        # arena: page faults cost as much as the copy; bench/RESULTS.md, "Third follow-up").
        self.pin_memory = pin_memory or (self.device is not None and self.device.type == "cuda")
        self.drop_bos = bool(drop_bos and s.tokenization.get("prepend_bos"))
        if self.drop_bos and s.context_size is None:
            raise ActcacheError(f"drop_bos needs the context size, which the manifest of {s.url} does not record")
        self.exclude: tuple[int, ...] = _exclusions(s, exclude_special_tokens, exclude_tokens)
        if self.examples:
            example_rows.check_reader(
                s, with_tokens=with_tokens, with_positions=with_positions, exclude=bool(self.exclude)
            )
        kept = [moments.kept_stats(x.manifest, self.exclude, self.drop_bos) for x in self.sets]
        self.stats: Any = tuple(kept) if self.several else kept[0]
        """Statistics of the rows this dataset yields (its exclusions applied): ``n``, ``mean``, ``var``,
        ``mean_norm``, ``scale`` ..., as in ``manifest["stats"]``; None where the manifest cannot give them (a
        tuple of them, one per set, for several sets)."""
        self._norms = [
            _normalizer(x, normalize, st, self.exclude, self.drop_bos) if normalize else None
            for x, st in zip(self.sets, kept, strict=True)
        ]
        self.normalize = normalize
        self._late = on_device_casts(self.device, [x.dtype for x in self.sets], self._dtypes, self._norms)
        """Per set, the cast and normalisation left to the device; the host then makes batches as stored."""
        for k, late in enumerate(self._late):
            if late is not None:
                self._dtypes[k], self._norms[k] = self.sets[k].dtype, None
        # The epoch lives in shared memory: DataLoader workers are processes, and persistent ones keep the copy
        # of the dataset they started with; each __iter__ reads the current value.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._spare: dict[str, torch.Tensor] | None = None
        self.rows_per_shard: list[int]
        """Rows each shard contributes to an epoch, after exclusions (in the order of ``set.records``)."""
        self.excluded: dict[int, int] = {}
        """Rows left out per epoch for each excluded token id (all ranks; ``drop_bos`` positions not included)."""
        if self.exclude or (self.drop_bos and (s.layout == "rows" or self.examples)):
            self.rows_per_shard, self.excluded = self._scan()
        elif self.drop_bos:
            self.rows_per_shard = [r.n_seq * (s.context_size - 1) for r in s.records]  # type: ignore[operator]
        else:
            self.rows_per_shard = [r.n_tokens for r in s.records]
        self._bases = [0]  # flat index of each shard's first row in the set (positions of sequence sets)
        for r in s.records[:-1]:
            self._bases.append(self._bases[-1] + r.n_tokens)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_spare": None}  # a DataLoader worker makes its own buffer

    # -- what an epoch holds ------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for another epoch (call before iterating; DataLoader workers, persistent or not, see it)."""
        self._epoch.fill_(epoch)

    @property
    def n_tokens(self) -> int:
        """Rows one epoch holds across all ranks: the set's rows less the excluded ones."""
        return sum(self.rows_per_shard)

    @property
    def rows_per_rank(self) -> int:
        """Rows each rank yields per epoch (``n_tokens // world_size``)."""
        return self.n_tokens // self.world_size

    def __len__(self) -> int:
        """Batches this rank yields per epoch, whatever the number of DataLoader workers."""
        full, rest = divmod(self.rows_per_rank, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def pieces(self, worker: int = 0, num_workers: int = 1, *, epoch: int | None = None) -> list[Piece]:
        """What one DataLoader worker of this rank reads in an epoch (default: the current one); disjoint across
        all ranks and workers."""
        order = range(len(self.set.records))
        if self.shuffle_buffer:
            epoch = self.epoch if epoch is None else epoch
            g = torch.Generator().manual_seed(_seed(self.seed, epoch, "shards"))  # the same on every rank
            order = torch.randperm(len(self.set.records), generator=g).tolist()  # type: ignore[assignment]
        return deal(
            self.rows_per_shard,
            order,
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=num_workers,
            batch_size=self.batch_size,
        )

    def _sizes(self, rows: int, last: bool) -> list[int]:
        """Batch sizes a worker yields: full batches, then its rest if it is the rank's last worker."""
        full, rest = divmod(rows, self.batch_size)
        return [self.batch_size] * full + ([rest] if rest and last and not self.drop_last else [])

    # -- reading --------------------------------------------------------------------------------------
    def _scan(self) -> tuple[list[int], dict[int, int]]:
        """Kept rows per shard and excluded rows per token id, from the shards' token ids alone."""
        stop = threading.Event()

        def load(r: Record):
            tokens, positions = retried(lambda: self._read_tokens(r), f"reading the tokens of shard {r.index}", stop)
            kept = self._kept(tokens, positions)
            if kept is None:
                return len(tokens), {}
            dropped = tokens[~kept & ~self._bos_mask(tokens, positions)] if self.drop_bos else tokens[~kept]
            ids, n = torch.unique(dropped, return_counts=True)
            return int(kept.sum()), dict(zip(ids.tolist(), n.tolist(), strict=True))

        counts, excluded = [], dict.fromkeys(self.exclude, 0)
        try:
            for n, by_id in prefetched(load, self.set.records, max(self.prefetch, 4)):
                counts.append(n)
                for i, k in by_id.items():
                    excluded[i] = excluded.get(i, 0) + k
        finally:
            stop.set()
        return counts, excluded

    def _read_tokens(self, r: Record) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.examples:
            return self.set.read_tokens(r)
        rows = example_rows.read(self.set, r, self._first_examples[r.index], verify=False)
        return rows.tokens, rows.positions  # type: ignore[return-value]  # check_reader: no scan of a mean set

    def _bos_mask(self, tokens: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """True at every sequence's first position."""
        ctx = self.set.context_size
        if positions is not None:
            return positions % ctx == 0  # type: ignore[operator]
        mask = torch.zeros(len(tokens), dtype=torch.bool)
        mask[::ctx] = True
        return mask

    def _kept(self, tokens: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor | None:
        """Mask of the rows kept (None: all of them)."""
        if not self.exclude and not self.drop_bos:
            return None
        keep = torch.ones(len(tokens), dtype=torch.bool)
        if self.exclude:
            keep &= ~torch.isin(tokens, torch.tensor(self.exclude, dtype=tokens.dtype))
        if self.drop_bos:
            keep &= ~self._bos_mask(tokens, positions)
        return keep

    def _load(self, piece: Piece, stop: threading.Event) -> _Chunk:
        if self.examples:
            return self._load_examples(piece, stop)
        r = self.set.records[piece.shard]
        shard = retried(lambda: self.set.read(r, verify=self.verify), f"reading shard {r.index}", stop)
        tokens = shard.tokens.reshape(-1)
        kept = self._kept(tokens, shard.positions)
        rows = self._piece_rows(piece, r, kept)
        positions = None
        if self.with_positions:
            if shard.positions is not None:
                positions = shard.positions
            else:  # sequences: the flat index in this set
                positions = torch.arange(self._bases[piece.shard], self._bases[piece.shard] + len(tokens))
        acts = [shard.activations.reshape(-1, self.d)]
        for other in self.sets[1:]:
            o = other.records[piece.shard]
            more = retried(lambda x=other, o=o: x.read(o, verify=self.verify), f"reading shard {o.index}", stop)  # type: ignore[misc]
            if not torch.equal(more.tokens.reshape(-1), tokens) or (
                shard.positions is not None and not torch.equal(more.positions, shard.positions)
            ):
                raise ActcacheError(
                    f"shard {o.index} of {other.url} holds other tokens than shard {r.index} of {self.set.url}; "
                    "read together only sets extracted from the same tokens"
                )
            acts.append(more.activations.reshape(-1, other.d))
        return _Chunk(acts, tokens, positions, rows, piece.stop - piece.start)

    def _load_examples(self, piece: Piece, stop: threading.Event) -> _Chunk:
        """``_load`` for example sets: the shard's stored rows, each with its token, position and columns."""
        r = self.set.records[piece.shard]
        first = self._first_examples[piece.shard]
        parts = []
        for x in self.sets:
            o = x.records[piece.shard]
            parts.append(
                retried(
                    lambda x=x, o=o: example_rows.read(x, o, first, verify=self.verify),  # type: ignore[misc]
                    f"reading shard {o.index}",
                    stop,
                )
            )
        main = parts[0]
        for x, other in zip(self.sets[1:], parts[1:], strict=True):
            if main.tokens is not None and not torch.equal(other.tokens, main.tokens):  # type: ignore[arg-type]
                raise ActcacheError(
                    f"shard {r.index} of {x.url} holds other tokens than that of {self.set.url}; "
                    "read together only sets extracted from the same tokens"
                )
        if main.tokens is not None:
            kept = self._kept(main.tokens, main.positions)
        else:
            kept = None
        rows = self._piece_rows(piece, r, kept)
        if self.with_columns:
            self._strings[r.index] = main.strings
        columns = {f"column.{k}": v for k, v in main.columns.items()} if self.with_columns else {}
        return _Chunk([p.acts for p in parts], main.tokens, main.positions, rows, piece.stop - piece.start, columns)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None and (self.device is not None or self.pin_memory):
            raise ActcacheError(
                "device= and pin_memory= work with num_workers=0 (the dataset reads in its own "
                "threads); with DataLoader workers pass pin_memory=True to the DataLoader instead"
            )
        batches = self._batches(worker, num_workers)
        if self.device is not None:
            batches = _on_device(batches, self.device, self._late)  # type: ignore[arg-type]
        _open.add(batches)
        return batches

    def _batches(self, worker: int, num_workers: int) -> Iterator[Any]:
        epoch = self.epoch
        pieces = self.pieces(worker, num_workers, epoch=epoch)
        rows = sum(p.stop - p.start for p in pieces)
        sizes = self._sizes(rows, last=worker == num_workers - 1)
        if not sizes:
            return
        stop = threading.Event()
        chunks = prefetched(lambda p: self._load(p, stop), pieces, self.prefetch)
        try:
            n = makers.count(self.threads)  # here, where the caller's intra-op count is in force
            if not self.shuffle_buffer and self.threads is None:
                # In order, makers only when asked: on 2 cores they shortened epochs of 61 MB shards by 15-25% but
                # not of 9.5 MB ones, and the bench's round-robin measured those slower (bench/RESULTS.md).
                n = 1
            if self.shuffle_buffer:
                g = torch.Generator().manual_seed(_seed(self.seed, epoch, self.world_size, self.rank, worker))
                yield from one_thread(self._shuffled(chunks, sizes, rows, g, n))
            else:
                yield from one_thread(self._in_order(chunks, sizes, n))
        finally:
            stop.set()
            chunks.close()  # type: ignore[attr-defined]

    def _piece_rows(self, piece: Piece, r: Record, kept: torch.Tensor | None) -> slice | torch.Tensor:
        """The piece's rows of shard ``r``: a slice, or the indices of its kept rows (counted again: a shard
        whose kept rows differ from the scan's was rewritten meanwhile)."""
        if kept is None:
            return slice(piece.start, piece.stop)
        index = kept.nonzero().squeeze(1)
        if len(index) != self.rows_per_shard[piece.shard]:
            raise ActcacheError(f"shard {r.index} of {self.set.url} changed while being read; restart reading")
        return index[piece.start : piece.stop]


def _exclusions(s: ActivationSet, special: bool, explicit: Any) -> tuple[int, ...]:
    """Token ids whose rows are skipped: the set's special tokens (when asked) and ``explicit``, checked."""
    missing = [n for n in ("eos_id", "pad_id") if n not in s.tokenization]
    if special and missing:
        tok = s.tokenization
        warnings.warn(
            f"the manifest of {s.url} predates recording {' and '.join(missing)}: "
            "exclude_special_tokens skips the BOS and separator ids it records "
            f"({tok.get('bos_id')}, {tok.get('separator_id')}); add others with exclude_tokens",
            stacklevel=3,
        )
    return token_ids(s.manifest, special=special, ids=explicit, option="exclude_tokens")
