"""Normalisation statistics of a set: per-dimension mean and variance, mean (squared) L2 norm, NaN/Inf counts.

Per shard, ``of(acts)`` runs on the shard's storage-dtype tensor in the compress stage, beside the next
forward pass; its result travels in the shard's completion record (``to_json``: float64 vectors as base64,
exact). ``consolidate`` merges them in shard-index order (Chan et al.'s pairwise update on float64) into
``manifest["stats"]``::

    {"n": rows, "mean": [d], "var": [d] (population), "mean_norm": float, "mean_sq_norm": float,
     "scale": sqrt(d) / mean_norm, "nan": int, "inf": int}

``n`` counts the rows the moments cover: a row holding any NaN or Inf is left out of them and its non-finite
elements are counted in ``nan``/``inf`` instead, so the manifest never holds a non-finite number.

Beside the totals, each shard keeps the moments of a few groups of rows (``by_token``): the rows at a sequence's
first position and the others, each split by token id into the set's special tokens (BOS, EOS, pad, separator)
and all other tokens. The groups partition the rows, so merging the groups a reader keeps gives the exact
moments of the rows it yields, whichever of those ids it excludes and whether or not it drops BOS positions,
without another pass over the data (``manifest["moments"]["by_token"]``, merged like the totals).

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
from actcache.format.records import Record, check_sealed, digest, record_cap
from actcache.storage.store import Store

RECORD_FIELD = "moments"
"""Key of a shard's moments in its record's ``extra`` (kept out of the manifest's shard list)."""

BY_TOKEN_FIELD = "moments_by_token"
"""Key of a shard's per-group moments (``ByToken``) in its record's ``extra``."""

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


def of(acts: torch.Tensor, where: torch.Tensor | None = None) -> Moments:
    """Moments of one shard's activations (any shape ``[..., d]``, any float dtype), in fixed-size chunks; with
    ``where`` (a boolean mask of the rows, flat), of the rows it selects only."""
    flat = acts.reshape(-1, acts.shape[-1])
    d = flat.shape[1]
    rows = max(1, _CHUNK_ELEMENTS // d)
    total = Moments.empty(d)
    for i in range(0, flat.shape[0], rows):
        part = flat[i : i + rows]
        if where is not None:
            part = part[where[i : i + rows]]
        total = total.merge(_chunk(part.to(torch.float32).numpy()))
    return total


@dataclass(frozen=True)
class ByToken:
    """Moments of the groups that partition a shard's (or a set's) rows: ``first:<id>``/``rest:<id>`` for each
    tracked id at a sequence's first position / elsewhere, ``first:other``/``rest:other`` for every other token.
    Empty groups are absent."""

    ids: tuple[int, ...]
    """The token ids tracked (the set's special tokens)."""
    groups: dict[str, Moments]

    def merge(self, other: ByToken) -> ByToken | None:
        """Group by group; None when the two track different ids (nothing exact can be said then)."""
        if self.ids != other.ids:
            return None
        keys = sorted(set(self.groups) | set(other.groups))
        d = next(iter({**self.groups, **other.groups}.values())).d if keys else 0
        return ByToken(
            self.ids,
            {k: self.groups.get(k, Moments.empty(d)).merge(other.groups.get(k, Moments.empty(d))) for k in keys},
        )

    def kept(self, exclude: tuple[int, ...], drop_first: bool) -> Moments | None:
        """Moments of the rows left once rows with ``exclude`` ids (and, if ``drop_first``, every sequence's first
        row) are left out; None when ``exclude`` names an id not tracked (its rows hide in ``other``)."""
        if not set(exclude) <= set(self.ids) or not self.groups:
            return None
        total = None
        for k in sorted(self.groups):
            where, _, token = k.partition(":")
            if (drop_first and where == "first") or (token != "other" and int(token) in exclude):
                continue
            total = self.groups[k] if total is None else total.merge(self.groups[k])
        return total if total is not None else Moments.empty(next(iter(self.groups.values())).d)

    def to_json(self) -> dict[str, Any]:
        return {"ids": list(self.ids), "groups": {k: m.to_json() for k, m in sorted(self.groups.items())}}

    @classmethod
    def from_json(cls, obj: dict[str, Any], d: int) -> ByToken:
        ids = obj["ids"]
        if not isinstance(ids, list) or not all(type(i) is int for i in ids):
            raise ValueError("by_token ids must be a list of integers")
        groups = obj["groups"]
        if not isinstance(groups, dict):
            raise ValueError("by_token groups must be an object")
        return cls(tuple(ids), {str(k): Moments.from_json(v, d) for k, v in groups.items()})


def by_token(acts: torch.Tensor, tokens: torch.Tensor, first: torch.Tensor, ids: tuple[int, ...]) -> ByToken:
    """``ByToken`` of one shard: ``acts`` ``[..., d]``, ``tokens`` and ``first`` (True at a sequence's first
    position) with one entry per row."""
    tokens, first = tokens.reshape(-1), first.reshape(-1)
    special = torch.isin(tokens, torch.tensor(ids, dtype=tokens.dtype)) if ids else torch.zeros_like(first)
    groups = {}
    for where, at in (("first", first), ("rest", ~first)):
        for name, mask in [*((str(i), at & (tokens == i)) for i in ids), ("other", at & ~special)]:
            if bool(mask.any()):
                groups[f"{where}:{name}"] = of(acts, mask)
    return ByToken(tuple(ids), groups)


def without(record: Record) -> Record:
    """The record as the manifest lists it: its per-shard moments left out."""
    if RECORD_FIELD not in record.extra and BY_TOKEN_FIELD not in record.extra:
        return record
    return Record(
        record.index,
        record.file,
        record.n_seq,
        record.n_tokens,
        record.sha256,
        record.bytes,
        {k: v for k, v in record.extra.items() if k not in (RECORD_FIELD, BY_TOKEN_FIELD)},
    )


def _prefix(previous: dict[str, Any] | None, recs: list[Record], d: int) -> tuple[int, Moments, ByToken | None]:
    """The previous manifest's merged state (and its ``by_token``, where kept), if it still covers the first shards
    exactly."""
    try:
        p = previous["moments"]["prefix"]  # type: ignore[index]
        k = p["shards"]
        if type(k) is not int or not 0 < k <= len(recs) or p["digest"] != digest(recs[:k]):
            return 0, Moments.empty(d), None
        groups = ByToken.from_json(p["by_token"], d) if "by_token" in p else None
        return k, Moments.from_json(p["state"], d), groups
    except (KeyError, TypeError, ValueError):
        return 0, Moments.empty(d), None


def merged(
    recs: list[Record],
    d: int,
    *,
    full: Callable[[Record], bool],
    previous: dict[str, Any] | None,
    moments_of: Callable[[Record], Moments | None],
    by_token_of: Callable[[Record], ByToken | None] | None = None,
) -> dict[str, Any]:
    """``{"stats", "moments"}`` for the manifest over ``recs`` (sorted by index), or {} if a shard's are unknown.

    ``full(r)``: whether shard r has its final size (only such shards enter the carried prefix state, so an
    extension that grows the last shard keeps the prefix). ``moments_of(r)``: a shard's moments, or None.
    ``by_token_of(r)``: a shard's ``ByToken``, or None; ``moments["by_token"]`` is written only when every shard
    has one (tracking the same ids).
    """
    names = digest(recs)
    prev = (previous or {}).get("moments")
    if isinstance(prev, dict) and prev.get("digest") == names and previous and isinstance(previous.get("stats"), dict):
        return {"stats": previous["stats"], "moments": prev}  # the same shards: nothing to read
    k, total, groups = _prefix(previous, recs, d)
    tracking = by_token_of is not None and (k == 0 or groups is not None)
    prefix = (k, total, groups)
    for j in range(k, len(recs)):
        m = moments_of(recs[j])
        if m is None:
            return {}
        total = total.merge(m)
        if tracking and by_token_of is not None:
            g = by_token_of(recs[j])
            groups = g if j == 0 else (groups.merge(g) if g is not None and groups is not None else None)
            tracking = groups is not None
        if prefix[0] == j and recs[j].index == j and full(recs[j]):
            prefix = (j + 1, total, groups if tracking else None)
    state = {"shards": prefix[0], "digest": digest(recs[: prefix[0]]), "state": prefix[1].to_json()}
    if prefix[2] is not None:
        state["by_token"] = prefix[2].to_json()
    out = {"stats": total.stats(), "moments": {"digest": names, "prefix": state}}
    if tracking and groups is not None:
        out["moments"]["by_token"] = groups.to_json()
    return out


def from_records(store: Store, root: str, d: int, field: str = RECORD_FIELD) -> Callable[[Record], Any]:
    """A shard's moments (``field``: ``RECORD_FIELD``, or ``BY_TOKEN_FIELD`` for its ``ByToken``) from its record:
    the one in hand, else the stored one (records listed by a manifest carry none); None for records written
    before they existed."""
    parse = ByToken.from_json if field == BY_TOKEN_FIELD else Moments.from_json

    def get(r: Record) -> Any:
        obj = r.extra.get(field)
        if obj is None and RECORD_FIELD not in r.extra:  # a record in hand that has moments has all it will have
            try:
                rel = layout.record_file(r.index)
                obj = (check_sealed(store.read_json(f"{root}/{rel}", limit=record_cap(d)), rel).get("extra") or {}).get(
                    field
                )
            except (FileNotFoundError, ValueError, AttributeError):
                return None
        try:
            return parse(obj, d) if obj is not None else None
        except (KeyError, TypeError, ValueError):
            return None

    return get


def kept_stats(m: dict[str, Any], exclude: tuple[int, ...], drop_first: bool) -> dict[str, Any] | None:
    """The ``stats`` of the rows a reader keeps from the set of manifest ``m`` (leaving out rows with ``exclude``
    ids and, if ``drop_first``, every sequence's first row): the manifest's own when nothing is left out, merged
    from ``moments["by_token"]`` otherwise; None when the manifest cannot say (no ``by_token``, or an id it does
    not track)."""
    if not exclude and not drop_first:
        return m.get("stats")
    try:
        groups = ByToken.from_json(m["moments"]["by_token"], m["d"])
    except (KeyError, TypeError, ValueError):
        return None
    kept = groups.kept(exclude, drop_first)
    return kept.stats() if kept is not None else None
