"""Normalisation statistics of a set: per-dimension mean and variance, mean (squared) L2 norm, NaN/Inf counts.

Per shard, ``of(acts)`` runs on the shard's storage-dtype tensor in the compress stage, beside the next
forward pass; its result travels in the shard's completion record (``to_json``: float64 vectors as base64,
exact). ``consolidate`` merges them in shard-index order (Chan et al.'s pairwise update on float64) into
``manifest["stats"]``::

    {"n": rows, "mean": [d], "var": [d] (population), "mean_norm": float, "mean_sq_norm": float,
     "scale": sqrt(d) / mean_norm, "nan": int, "inf": int}

``n`` counts the rows the moments cover: a row holding any NaN or Inf is left out of them and its non-finite
elements are counted in ``nan``/``inf`` instead, so the manifest never holds a non-finite number.

The manifest's shard list never carries the per-shard vectors (a 1,000-shard set at d=4096 keeps a small
manifest): ``manifest["moments"]`` holds instead the merged state of the longest prefix of full shards, so a
rerun or an extension continues from it and reads only the records the manifest does not cover. Every merge
runs in the same order on the same float64 values, so a crashed-and-rerun set's stats are byte-identical to
an uninterrupted run's. The arithmetic is numpy (single-threaded): the same tensor gives the same bits in any
process, whatever torch's thread count.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from actcache.format import layout
from actcache.format.records import RECORD_LIMIT, Record, check_sealed, digest
from actcache.storage.store import Store

RECORD_FIELD = "moments"
"""Key of a shard's moments in its record's ``extra`` (kept out of the manifest's shard list)."""

_CHUNK_ELEMENTS = 1 << 20
"""Elements converted to float32 at a time: bounds the extra memory (4 MB) whatever the shard size."""


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f8").tobytes()).decode()


def _unb64(s: str, d: int) -> np.ndarray:
    a = np.frombuffer(base64.b64decode(s, validate=True), dtype="<f8").astype(np.float64)
    if a.shape != (d,):
        raise ValueError(f"moments vector has {a.size} values, expected {d}")
    return a


@dataclass(frozen=True)
class Moments:
    n: int
    """Rows covered (rows with a NaN or Inf are left out)."""
    mean: np.ndarray
    """float64 [d]"""
    m2: np.ndarray
    """float64 [d]: sum of squared deviations from ``mean``."""
    sum_norm: float
    sum_sq_norm: float
    nan: int
    inf: int

    @classmethod
    def empty(cls, d: int) -> Moments:
        return cls(0, np.zeros(d), np.zeros(d), 0.0, 0.0, 0, 0)

    @property
    def d(self) -> int:
        return self.mean.shape[0]

    def merge(self, other: Moments) -> Moments:
        """Exact pairwise merge (Chan, Golub & LeVeque); ``a.merge(b)`` is the moments of a's rows then b's."""
        nan, inf = self.nan + other.nan, self.inf + other.inf
        if other.n == 0:
            return Moments(self.n, self.mean, self.m2, self.sum_norm, self.sum_sq_norm, nan, inf)
        if self.n == 0:
            return Moments(other.n, other.mean, other.m2, other.sum_norm, other.sum_sq_norm, nan, inf)
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + delta * delta * (self.n * other.n / n)
        return Moments(n, mean, m2, self.sum_norm + other.sum_norm, self.sum_sq_norm + other.sum_sq_norm, nan, inf)

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "mean": _b64(self.mean),
            "m2": _b64(self.m2),
            "sum_norm": self.sum_norm,
            "sum_sq_norm": self.sum_sq_norm,
            "nan": self.nan,
            "inf": self.inf,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any], d: int) -> Moments:
        for k in ("n", "nan", "inf"):
            if type(obj[k]) is not int or obj[k] < 0:
                raise ValueError(f"moments {k} must be a non-negative integer")
        sums = (float(obj["sum_norm"]), float(obj["sum_sq_norm"]))
        if not all(math.isfinite(s) for s in sums):
            raise ValueError("moments sums must be finite")
        return cls(obj["n"], _unb64(obj["mean"], d), _unb64(obj["m2"], d), *sums, obj["nan"], obj["inf"])

    def stats(self) -> dict[str, Any]:
        """The manifest's ``stats`` (every number finite; None where no row was finite)."""
        if self.n == 0:
            return {
                "n": 0,
                "mean": None,
                "var": None,
                "mean_norm": None,
                "mean_sq_norm": None,
                "scale": None,
                "nan": self.nan,
                "inf": self.inf,
            }
        mean_norm = self.sum_norm / self.n
        out = {
            "n": self.n,
            "mean": self.mean.tolist(),
            "var": (self.m2 / self.n).tolist(),
            "mean_norm": mean_norm,
            "mean_sq_norm": self.sum_sq_norm / self.n,
            "scale": math.sqrt(self.d) / mean_norm if mean_norm > 0 else None,
            "nan": self.nan,
            "inf": self.inf,
        }
        json.dumps(out, allow_nan=False)  # raises rather than write Infinity/NaN (not JSON)
        return out


def _chunk(f: np.ndarray) -> Moments:
    """Moments of float32 rows ``f`` [rows, d]: float32 within the chunk, float64 for what is carried."""
    d = f.shape[1]
    sq = np.einsum("ij,ij->i", f, f)
    nan = inf = 0
    bad = ~np.isfinite(sq)
    if bad.any():
        rows = f[bad]
        nan, inf = int(np.isnan(rows).sum()), int(np.isinf(rows).sum())
        finite_rows = np.isfinite(rows).all(axis=1)  # rows whose square sum overflowed float32: keep them
        keep = ~bad
        keep[np.flatnonzero(bad)[finite_rows]] = True
        f = f[keep]
        sq = np.einsum("ij,ij->i", f.astype(np.float64), f.astype(np.float64))
    n = f.shape[0]
    if n == 0:
        return Moments(0, np.zeros(d), np.zeros(d), 0.0, 0.0, nan, inf)
    mean = f.sum(axis=0, dtype=np.float64) / n
    dev = f - mean.astype(np.float32)
    m2 = np.einsum("ij,ij->j", dev, dev).astype(np.float64)
    if not np.isfinite(m2).all():  # float32 overflow of huge deviations (bfloat16 range): redo in float64
        dev64 = f.astype(np.float64) - mean
        m2 = np.einsum("ij,ij->j", dev64, dev64)
    sq64 = sq.astype(np.float64)
    return Moments(n, mean, m2, float(np.sqrt(sq64).sum()), float(sq64.sum()), nan, inf)


def of(acts: torch.Tensor) -> Moments:
    """Moments of one shard's activations (any shape ``[..., d]``, any float dtype), in fixed-size chunks."""
    flat = acts.reshape(-1, acts.shape[-1])
    d = flat.shape[1]
    rows = max(1, _CHUNK_ELEMENTS // d)
    total = Moments.empty(d)
    for i in range(0, flat.shape[0], rows):
        total = total.merge(_chunk(flat[i : i + rows].to(torch.float32).numpy()))
    return total


def without(record: Record) -> Record:
    """The record as the manifest lists it: its per-shard moments left out."""
    if RECORD_FIELD not in record.extra:
        return record
    return Record(
        record.index,
        record.file,
        record.n_seq,
        record.n_tokens,
        record.sha256,
        record.bytes,
        {k: v for k, v in record.extra.items() if k != RECORD_FIELD},
    )


def _prefix(previous: dict[str, Any] | None, recs: list[Record], d: int) -> tuple[int, Moments]:
    """The previous manifest's merged state, if it still covers the first shards exactly."""
    try:
        p = previous["moments"]["prefix"]  # type: ignore[index]
        k = p["shards"]
        if type(k) is not int or not 0 < k <= len(recs) or p["digest"] != digest(recs[:k]):
            return 0, Moments.empty(d)
        return k, Moments.from_json(p["state"], d)
    except (KeyError, TypeError, ValueError):
        return 0, Moments.empty(d)


def merged(
    recs: list[Record],
    d: int,
    *,
    full: Callable[[Record], bool],
    previous: dict[str, Any] | None,
    moments_of: Callable[[Record], Moments | None],
) -> dict[str, Any]:
    """``{"stats", "moments"}`` for the manifest over ``recs`` (sorted by index), or {} if a shard's are unknown.

    ``full(r)``: whether shard r has its final size (only such shards enter the carried prefix state, so an
    extension that grows the last shard keeps the prefix). ``moments_of(r)``: a shard's moments, or None.
    """
    names = digest(recs)
    prev = (previous or {}).get("moments")
    if isinstance(prev, dict) and prev.get("digest") == names and previous and isinstance(previous.get("stats"), dict):
        return {"stats": previous["stats"], "moments": prev}  # the same shards: nothing to read
    k, total = _prefix(previous, recs, d)
    prefix = (k, total)
    for j in range(k, len(recs)):
        m = moments_of(recs[j])
        if m is None:
            return {}
        total = total.merge(m)
        if prefix[0] == j and recs[j].index == j and full(recs[j]):
            prefix = (j + 1, total)
    state = {"shards": prefix[0], "digest": digest(recs[: prefix[0]]), "state": prefix[1].to_json()}
    return {"stats": total.stats(), "moments": {"digest": names, "prefix": state}}


def from_records(store: Store, root: str, d: int) -> Callable[[Record], Moments | None]:
    """A shard's moments from its record: the one in hand, else the stored one (records listed by a manifest
    carry none); None for records written before moments existed."""

    def get(r: Record) -> Moments | None:
        obj = r.extra.get(RECORD_FIELD)
        if obj is None:
            try:
                rel = layout.record_file(r.index)
                obj = (check_sealed(store.read_json(f"{root}/{rel}", limit=RECORD_LIMIT), rel).get("extra") or {}).get(
                    RECORD_FIELD
                )
            except (FileNotFoundError, ValueError, AttributeError):
                return None
        try:
            return Moments.from_json(obj, d) if obj is not None else None
        except (KeyError, TypeError, ValueError):
            return None

    return get
