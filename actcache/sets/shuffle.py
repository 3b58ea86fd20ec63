"""``actcache shuffle``: a globally shuffled copy of a set, written as a new content-addressed "rows" set.

Every row (token position) of the source gets a 64-bit key, a seeded bijective hash (splitmix64) of its
flat position; the shuffled order is the rows sorted by key: a uniformly random permutation that the seed
alone fixes. Two passes keep memory bounded however large the set:

1. Per source shard: leave out excluded rows, sort the rest by key and write them as one spill file
   (``spill/NNNNNN.safetensors``: the keys, then the rows packed as bytes), then its record with the number
   of rows in each of B buckets. Bucket b holds the keys in [b, b + 1) * 2^64 / B, so in every spill file a
   bucket is one contiguous run.
2. Per bucket, in key order: read its run from every spill file (ranged reads), sort by key, and cut the
   rows into output shards of ``rows_per_shard``. At most ``bucket_rows`` rows are held at once (a bucket
   that came out larger is read in key slices), plus the output shard being assembled.

B only decides how the work is cut, never the bytes, so ``bucket_rows`` is not part of the key; the key
(``key.ShuffleKey``) holds the source set id and shard digest, the seed, the shard size and the exclusions.

Output shards (the "rows" layout): ``activations [n, d]`` in the source's dtype, ``tokens [n]`` int32 and
``positions [n]`` int64, the row's flat index in the source (``sequence * context_size + position``).
They are written as extraction writes: bytes first, completion record last, each file whole or absent;
the manifest once every shard is done, then the spill files are removed. A kill at any point, then a
rerun, gives the same bytes; a rerun of a finished shuffle only reads its manifest.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from actcache import crashpoints
from actcache.errors import ActcacheError, Failure, opt
from actcache.format import layout, manifest, moments, records, shard
from actcache.format.commit import Points, Shard, commit
from actcache.format.key import FORMAT_VERSION, ShuffleKey
from actcache.format.records import Record
from actcache.read.exclude import special_ids, token_ids
from actcache.read.reader import ActivationSet, open_set
from actcache.storage import leases
from actcache.storage.store import Store, StoreRef

DEFAULT_BUCKET_ROWS = 1 << 20
SHARD_POINTS = Points(shard_written="shuffle.shard-written", record_written="shuffle.shard-recorded")
MANIFEST_POINTS = Points(manifest_written="shuffle.manifest-written")  # the set is complete, its spills still there
_NOT_PROVENANCE = ("shards", "stats", "moments", "created_at", "updated_at")


@dataclass(frozen=True)
class ShuffleResult:
    url: str
    rows: int
    shards: int
    excluded_rows: int
    skipped: bool
    """True when the shuffled set was already complete and nothing was written."""


# -- the permutation -------------------------------------------------------------------------------------
def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64 (so distinct positions never share a key)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def row_keys(positions: np.ndarray, seed: int) -> np.ndarray:
    """The sort key of each row: distinct for distinct positions, uniform, fixed by the seed."""
    salt = _mix(np.array([seed], dtype=np.uint64))[0]
    return _mix(positions.astype(np.uint64) ^ salt)


def bucket_of(keys: np.ndarray, n_buckets: int) -> np.ndarray:
    """floor(key * B / 2^64), without overflow for B < 2^32: non-decreasing in the key."""
    return ((keys >> np.uint64(32)) * np.uint64(n_buckets)) >> np.uint64(32)


# -- rows packed as bytes in a spill file ----------------------------------------------------------------
def _pack(acts: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    n = acts.shape[0]
    return torch.cat(
        [
            acts.contiguous().view(torch.uint8).reshape(n, acts.shape[1] * acts.element_size()),
            tokens.contiguous().view(torch.uint8).reshape(n, 4),
            positions.contiguous().view(torch.uint8).reshape(n, 8),
        ],
        dim=1,
    )


def _unpack(rows: np.ndarray, dtype: torch.dtype, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(rows)
    a = d * dtype.itemsize

    def column(lo: int, hi: int, as_dtype: torch.dtype) -> torch.Tensor:  # fresh storage: aligned for the view
        return t[:, lo:hi].clone(memory_format=torch.contiguous_format).view(as_dtype)

    return (
        column(0, a, dtype),
        column(a, a + 4, torch.int32).reshape(-1),
        column(a + 4, a + 12, torch.int64).reshape(-1),
    )


def _data_starts(data: bytes) -> dict[str, int]:
    """Where each tensor's bytes start in a safetensors file."""
    end = 8 + int.from_bytes(data[:8], "little")
    header = json.loads(data[8:end])
    return {name: end + info["data_offsets"][0] for name, info in header.items() if name != "__metadata__"}


# -- the job -------------------------------------------------------------------------------------------
@dataclass
class _Job:
    src: ActivationSet
    out: Store
    key: ShuffleKey
    bucket_rows: int
    jobs: int
    on_step: Callable[[str], None] | None

    @property
    def sid(self) -> str:
        return self.key.id

    @property
    def d(self) -> int:
        return self.src.manifest["d"]

    @property
    def dtype(self) -> torch.dtype:
        return shard.TORCH_DTYPES[self.src.manifest["dtype"]]

    def step(self, what: str) -> None:
        if self.on_step:
            self.on_step(what)

    # pass 1
    def spill(self, r: Record, n_buckets: int) -> dict[str, Any]:
        """Write source shard ``r``'s spill file, then its sealed record (returned)."""
        m = self.src.manifest
        tk = m["key"]["tokens"]
        sh = self.src.read(r, verify=True)
        acts, tokens = sh.activations.reshape(-1, self.d), sh.tokens.reshape(-1)
        positions = r.index * tk["seqs_per_shard"] * tk["context_size"] + torch.arange(len(tokens), dtype=torch.int64)
        if self.key.exclude:
            keep = ~torch.isin(tokens, torch.tensor(self.key.exclude, dtype=torch.int32))
            acts, tokens, positions = acts[keep], tokens[keep], positions[keep]
        keys = row_keys(positions.numpy(), self.key.seed)
        order = np.argsort(keys)
        keys = keys[order]
        o = torch.from_numpy(order)
        rows = _pack(acts[o], tokens[o], positions[o])
        counts = np.bincount(bucket_of(keys, n_buckets).astype(np.int64), minlength=n_buckets)
        enc = shard.encode({"keys": torch.from_numpy(keys.view(np.int64)), "rows": rows})
        starts = _data_starts(enc.data)
        self.out.write_bytes(f"{self.sid}/{layout.spill_file(r.index)}", enc.data)
        crashpoints.point("shuffle.spill-written")
        record = records.sealed(
            {
                "index": r.index,
                "rows": len(keys),
                "excluded": r.n_tokens - len(keys),
                "buckets": n_buckets,
                "counts": counts.tolist(),
                "bytes": len(enc.data),
                "sha256": enc.sha256,
                "row_bytes": rows.shape[1],
                "keys_at": starts["keys"],
                "rows_at": starts["rows"],
            }
        )
        self.out.write_json(f"{self.sid}/{layout.spill_record(r.index)}", record)
        crashpoints.point("shuffle.spill-recorded")
        return record

    # pass 2
    def gather(self, spills: list[dict], b: int, starts: np.ndarray, counts: np.ndarray, emit) -> None:
        """Every row of bucket ``b`` in key order, handed to ``emit`` in slices of at most ``bucket_rows``."""
        pieces = [(i, int(starts[i, b]), int(counts[i, b])) for i in range(len(spills)) if counts[i, b]]

        def read(piece: tuple[int, int, int], at: str, width: int, lo: int = 0, hi: int | None = None) -> bytes:
            i, start, n = piece
            hi = n if hi is None else hi
            s = spills[i]
            try:
                return self.out.read_range(
                    f"{self.sid}/{layout.spill_file(s['index'])}",
                    s[at] + (start + lo) * width,
                    s[at] + (start + hi) * width,
                )
            except FileNotFoundError:
                raise Failure(
                    f"{self.out.url_of(self.sid)} was removed while it was written (`actcache rm`?): its spill file "
                    f"{layout.spill_file(s['index'])} is gone; rerun the same shuffle"
                ) from None

        with ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="actcache-shuffle") as pool:
            keys = list(pool.map(lambda p: np.frombuffer(read(p, "keys_at", 8), dtype=np.uint64), pieces))
            total = sum(len(k) for k in keys)
            bounds: list[Any] = [None, None]
            if total > self.bucket_rows:  # larger than allowed: cut at key quantiles into slices that fit
                every = np.sort(np.concatenate(keys))
                bounds = [None, *every[self.bucket_rows :: self.bucket_rows].tolist(), None]
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
                ranges = [
                    (
                        0 if lo is None else int(np.searchsorted(k, np.uint64(lo))),
                        len(k) if hi is None else int(np.searchsorted(k, np.uint64(hi))),
                    )
                    for k in keys
                ]
                rows = list(
                    pool.map(
                        lambda a: np.frombuffer(
                            read(a[0], "rows_at", spills[a[0][0]]["row_bytes"], *a[1]), dtype=np.uint8
                        ),
                        zip(pieces, ranges, strict=True),
                    )
                )
                k = np.concatenate([kk[r0:r1] for kk, (r0, r1) in zip(keys, ranges, strict=True)])
                width = spills[0]["row_bytes"]
                packed = np.concatenate([r.reshape(-1, width) for r in rows])
                emit(*_unpack(packed[np.argsort(k)], self.dtype, self.d))


class _Writer:
    """Cuts rows arriving in shuffled order into output shards; shards already done are not rewritten."""

    def __init__(self, job: _Job, n_rows: int, done: set[int]):
        self.job, self.n_rows, self.done = job, n_rows, done
        self.per = job.key.rows_per_shard
        self.next_row = 0
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def skip(self, n: int) -> None:
        assert not self.pending, "a bucket is skipped only when every shard it touches is done"
        self.next_row += n

    def add(self, acts: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        i, n = 0, len(tokens)
        while i < n:
            j = self.next_row // self.per
            end = min((j + 1) * self.per, self.n_rows)
            take = min(n - i, end - self.next_row)
            if j not in self.done:
                self.pending.append((acts[i : i + take], tokens[i : i + take], positions[i : i + take]))
            self.next_row += take
            i += take
            if self.next_row == end and j not in self.done:
                self.write(j)

    def write(self, j: int) -> None:
        acts, tokens, positions = (torch.cat(parts) for parts in zip(*self.pending, strict=True))
        self.pending = []
        sid = self.job.sid
        enc = shard.encode(
            {"activations": acts, "tokens": tokens, "positions": positions},
            metadata={"set_id": sid, "index": str(j), "layout": "rows"},
        )
        rel = layout.shard_file(j, "none")
        tok = self.job.src.manifest.get("tokenization") or {}
        extra = {"set_id": sid, "stats": shard.stats(acts), moments.RECORD_FIELD: moments.of(acts).to_json()}
        if type(ctx := tok.get("context_size")) is int:  # the rows at a sequence's first position: positions % ctx
            groups = moments.by_token(acts, tokens, positions % ctx == 0, special_ids(tok))
            extra[moments.BY_TOKEN_FIELD] = groups.to_json()
        record = Record(j, rel, len(tokens), len(tokens), enc.sha256, len(enc.data), extra)
        commit(self.job.out, sid, [Shard(record, enc.data)], points=SHARD_POINTS)
        self.job.step("shard")


@leases.releasing
def shuffle_set(
    src: str | StoreRef,
    *,
    out: str | StoreRef | None = None,
    seed: int = 0,
    rows_per_shard: int | None = None,
    exclude_special: bool = False,
    exclude_ids: Any = (),
    bucket_rows: int = DEFAULT_BUCKET_ROWS,
    jobs: int = 8,
    on_step: Callable[[str], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> ShuffleResult:
    """Write (or find) the globally shuffled copy of the set at ``src`` in the store ``out`` (default: the
    source's). Rows whose token is special (``exclude_special``) or in ``exclude_ids`` are left out.

    ``src`` and ``out`` are URLs, or ``StoreRef``s where a store needs options or a credentials block."""
    if not 0 <= seed < 1 << 64:
        raise ActcacheError(f"{opt('seed')} must be between 0 and 2^64 - 1, got {seed}")
    for name, v in (("bucket_rows", bucket_rows), ("jobs", jobs), ("rows_per_shard", rows_per_shard or 1)):
        if v < 1:
            raise ActcacheError(f"{opt(name)} must be at least 1, got {v}")
    source = open_set(src)
    m = source.manifest
    if m.get("layout") == "rows":
        raise ActcacheError(
            f"{source.url} is already a shuffled set; shuffle its source "
            f"({m['source']['set_id']}) with another {opt('seed')} instead"
        )
    exclude = token_ids(m, special=exclude_special, ids=exclude_ids)
    key = ShuffleKey(
        source=source.set_id,
        source_shards=records.digest(source.records),
        seed=seed,
        rows_per_shard=rows_per_shard or m["shard_tokens"],
        exclude=exclude,
    )
    target = source.store if out is None else StoreRef.of(out).open()
    if source.holds(target):
        raise ActcacheError(
            f"{opt('out')} {target.url!r} is inside the set {source.url}; give a store outside it (the default is "
            "the source's own store)"
        )
    target.check_writable(opt("out"))
    job = _Job(source, target, key, bucket_rows, jobs, on_step)
    sid = key.id
    target.sweep_temp(sid)
    leases.sweep(target, sid)

    scan = records.scan(target, sid, layout.MANIFEST)
    c = scan.consolidated
    if (
        c
        and c.get("complete")
        and c.get("key") == json.loads(json.dumps(key.to_dict()))
        and all(scan.is_done(r["index"], r["n_seq"]) for r in c["shards"])
    ):
        if any(rel.startswith(layout.SPILL + "/") for rel in scan.entries):
            target.remove_tree(f"{sid}/{layout.SPILL}")  # a kill after the manifest left them
        return ShuffleResult(target.url_of(sid), c["n_tokens"], c["n_shards"], c["excluded"]["rows"], True)

    # A writer from here on: `rm` refuses the set, and a set removed meanwhile is not written again. (Its look above
    # only read: a complete set is left as it is, with nothing written.)
    leases.acquire(target, sid)
    scan = records.scan(target, sid, layout.MANIFEST)

    # Pass 1: a spill file per source shard (a rerun keeps those recorded, and their bucket count).
    spills = _spill_records(target, sid, scan)
    n_buckets = (
        next(iter(spills.values()))["buckets"]
        if spills
        else max(1, min(1 << 31, math.ceil(2 * source.n_tokens / bucket_rows)))
    )
    spill_todo = sum(r.index not in spills for r in source.records)
    if on_total:  # pass 1's spills and, at most, every output shard (known exactly once pass 1 is done)
        on_total(spill_todo + math.ceil(source.n_tokens / key.rows_per_shard))
    for r in source.records:
        if r.index not in spills:
            spills[r.index] = job.spill(r, n_buckets)
            job.step("spill")
    ordered = [spills[r.index] for r in source.records]
    if any(s["buckets"] != n_buckets for s in ordered):
        raise ActcacheError(
            f"the spill files of {target.url_of(sid)} disagree on their bucket count; delete "
            f"{target.url_of(sid + '/' + layout.SPILL)} and rerun"
        )

    # Pass 2: buckets in key order, cut into output shards.
    counts = np.array([s["counts"] for s in ordered], dtype=np.int64).reshape(len(ordered), n_buckets)
    starts = np.cumsum(counts, axis=1) - counts
    totals = counts.sum(axis=0)
    n_rows = int(totals.sum())
    per = key.rows_per_shard
    n_out = math.ceil(n_rows / per)
    size = [min(per, n_rows - j * per) for j in range(n_out)]
    scan = records.scan(target, sid, layout.MANIFEST)
    done = {j for j in range(n_out) if scan.is_done(j, size[j])}
    if on_total:
        on_total(spill_todo + n_out - len(done))
    writer = _Writer(job, n_rows, done)
    offset = 0
    for b in range(n_buckets):
        n_b = int(totals[b])
        if not n_b:
            continue
        touched = range(offset // per, (offset + n_b - 1) // per + 1)
        if all(j in done for j in touched):
            writer.skip(n_b)
        else:
            job.gather(ordered, b, starts, counts, writer.add)
        offset += n_b

    excluded = sum(s["excluded"] for s in ordered)
    _write_manifest(job, n_rows, size, excluded)
    target.remove_tree(f"{sid}/{layout.SPILL}")
    return ShuffleResult(target.url_of(sid), n_rows, n_out, excluded, False)


def _spill_records(store: Store, sid: str, scan: records.Scan) -> dict[int, dict]:
    """The spill records an earlier (interrupted) run left that can be trusted: sealed, and their spill file in
    place with the recorded size and sha256.

    A damaged spill (a record edited or rotted, a file whose bytes changed) counts as absent: that source shard is
    spilled again from its verified bytes, as a cache recomputes what it cannot trust, rather than failing with
    ``DamagedFile`` and leaving the user to delete a temporary file by hand. Every reused spill file is re-hashed
    (whatever its mtime: bit rot changes none): it costs one read of what is reused, only on a rerun after a crash.
    """
    out = {}
    for rel in scan.entries:
        i = layout.parse_spill_record(rel)
        if i is None:
            continue
        try:
            s = records.check_sealed(store.read_json(f"{sid}/{rel}", limit=records.RECORD_LIMIT), rel)
            entry = scan.entries.get(layout.spill_file(i))
            if (
                records.SEAL not in s
                or s["index"] != i
                or entry is None
                or entry.size != s["bytes"]
                or sum(s["counts"]) != s["rows"]
            ):
                continue  # unsealed (written before spills were sealed), another shard's, or incomplete
            spill = Record(i, layout.spill_file(i), 0, 0, s["sha256"], s["bytes"])
            if records.hash_matches(store, sid, spill):
                out[i] = s
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            continue  # damaged: that source shard is spilled again
    return out


def _write_manifest(job: _Job, n_rows: int, size: list[int], excluded: int) -> None:
    sid, src = job.sid, job.src.manifest
    scan = records.scan(job.out, sid, layout.MANIFEST)
    recs = [r for r in scan.sorted_records() if r.index < len(size) and scan.is_done(r.index, size[r.index])]
    if len(recs) != len(size):
        raise ActcacheError(
            f"{len(size) - len(recs)} shards of {job.out.url_of(sid)} vanished while it was "
            "written; rerun the same shuffle"
        )
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    m = {
        "format_version": FORMAT_VERSION,
        "set_id": sid,
        "key": job.key.to_dict(),
        "layout": "rows",
        "source": {k: v for k, v in src.items() if k not in _NOT_PROVENANCE},
        **{k: src.get(k) for k in ("model", "dataset", "tokenization", "hook", "layer", "hook_shape", "d", "dtype")},
        "codec": "none",
        "codec_level": 0,
        "seed": job.key.seed,
        "rows_per_shard": job.key.rows_per_shard,
        "excluded": {"ids": list(job.key.exclude), "rows": excluded},
        "versions": manifest.versions(),
        "n_shards": len(recs),
        "n_tokens": n_rows,
        "bytes": sum(r.bytes for r in recs),
        "target_tokens": n_rows,
        "complete": True,
        "created_at": (scan.consolidated or {}).get("created_at", now),
        "updated_at": now,
        "shards": [moments.without(r).to_dict() for r in recs],
    }
    m |= moments.merged(
        recs,
        job.d,
        full=lambda r: r.n_seq == job.key.rows_per_shard,
        previous=scan.consolidated,
        moments_of=moments.from_records(job.out, sid, job.d),
        by_token_of=moments.from_records(job.out, sid, job.d, moments.BY_TOKEN_FIELD),
    )
    commit(job.out, sid, manifest_doc=m, points=MANIFEST_POINTS)
