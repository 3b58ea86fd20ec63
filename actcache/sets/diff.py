"""Compare two sets shard by shard: identical bytes, or how far apart their tokens and activations are.

Shards with the same sha256 (and codec) are identical without being read. Others are decoded one pair at
a time and compared in float64, in slices of at most ~4M values, so memory stays at about two shards
whatever the size of the sets. Per shard: whether the tokens are equal, the largest absolute difference
``max|a - b|``, the largest difference relative to B's largest magnitude ``max|a - b| / max|b|``, and how
many values differ beyond ``atol + rtol * |b|`` (``torch.isclose``'s rule; NaN equals NaN at the same place).
The field names of ``SetDiff.to_json`` are those of ``actcache diff --json``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from actcache.errors import ActcacheError

SLICE_VALUES = 1 << 22


@dataclass(frozen=True)
class ShardDiff:
    index: int
    identical: bool
    """Same stored bytes (sha256)."""
    tokens_equal: bool
    max_abs_diff: float
    max_rel_diff: float
    n_beyond: int
    """Values with |a - b| > atol + rtol * |b|."""

    @property
    def differs(self) -> bool:
        return not self.tokens_equal or self.n_beyond > 0


@dataclass(frozen=True)
class SetDiff:
    a: str
    b: str
    atol: float
    rtol: float
    shards: list[ShardDiff]
    only_in_a: list[int]
    only_in_b: list[int]

    @property
    def same(self) -> bool:
        return not self.only_in_a and not self.only_in_b and not any(d.differs for d in self.shards)

    @property
    def max_abs_diff(self) -> float:
        return max((d.max_abs_diff for d in self.shards), default=0.0)

    @property
    def max_rel_diff(self) -> float:
        return max((d.max_rel_diff for d in self.shards), default=0.0)

    def summary(self) -> str:
        n, differ = len(self.shards), [d.index for d in self.shards if d.differs]
        identical = sum(d.identical for d in self.shards)
        head = "same" if self.same else "differ"
        return (
            f"{head}: {n} shards compared, {identical} byte-identical, {len(differ)} differ "
            f"(max abs {self.max_abs_diff:.6g}, max rel {self.max_rel_diff:.6g}; "
            f"atol {self.atol}, rtol {self.rtol})"
            + (f", {len(self.only_in_a)} only in A" if self.only_in_a else "")
            + (f", {len(self.only_in_b)} only in B" if self.only_in_b else "")
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "same": self.same,
            "atol": self.atol,
            "rtol": self.rtol,
            "shards_compared": len(self.shards),
            "shards_identical": sum(d.identical for d in self.shards),
            "shards_differ": [d.index for d in self.shards if d.differs],
            "only_in_a": self.only_in_a,
            "only_in_b": self.only_in_b,
            "max_abs_diff": _finite(self.max_abs_diff),
            "max_rel_diff": _finite(self.max_rel_diff),
            "shards": [
                {**asdict(d), "max_abs_diff": _finite(d.max_abs_diff), "max_rel_diff": _finite(d.max_rel_diff)}
                for d in self.shards
            ],
        }


def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)  # JSON has no inf/nan


def _shape(s: Any) -> tuple:
    m = s.manifest
    return m["key"]["tokens"]["context_size"], m["d"], tuple(m.get("hook_shape") or ())


def check_comparable(a: Any, b: Any) -> None:
    """Refuse (one line) two sets that cannot be compared shard by shard."""
    for s in (a, b):
        if s.manifest.get("layout") == "rows":
            raise ActcacheError(
                f"{s.url} is a shuffled copy (rows); diff compares extracted sets: compare their "
                "sources, or shuffle both with the same --seed and compare those with `cmp`"
            )
    if _shape(a) != _shape(b):
        (ca, da, ha), (cb, db, hb) = _shape(a), _shape(b)
        raise ActcacheError(
            f"the sets have different shapes (context {ca} vs {cb}, d {da} vs {db}, hook shape "
            f"{list(ha)} vs {list(hb)}); diff compares sets of one shape"
        )
    ta, tb = a.manifest["shard_tokens"], b.manifest["shard_tokens"]
    if ta != tb:
        raise ActcacheError(
            f"the sets have different shard sizes ({ta} vs {tb} tokens); diff compares shard by "
            "shard: extract one again with --shard-tokens of the other"
        )


def compare(a: Any, b: Any, *, atol: float = 0.0, rtol: float = 0.0, on_shard=None, on_total=None) -> SetDiff:
    """Compare ActivationSets ``a`` and ``b`` (see the module docstring); ``on_total(n)`` once the shards both
    hold are known, ``on_shard(index)`` after each pair (progress)."""
    if atol < 0 or rtol < 0:
        raise ActcacheError(f"--atol and --rtol must be >= 0, got {atol} and {rtol}")
    check_comparable(a, b)
    ra, rb = {r.index: r for r in a.records}, {r.index: r for r in b.records}
    shards = []
    both = sorted(ra.keys() & rb.keys())
    if on_total:
        on_total(len(both))
    for i in both:
        x, y = ra[i], rb[i]
        if x.n_seq != y.n_seq:
            raise ActcacheError(
                f"shard {i} holds {x.n_seq} sequences in A and {y.n_seq} in B; the sets were cut "
                "differently and cannot be compared shard by shard"
            )
        if x.sha256 == y.sha256 and a.manifest["codec"] == b.manifest["codec"]:
            shards.append(ShardDiff(i, True, True, 0.0, 0.0, 0))
        else:
            shards.append(_compare_shard(i, a.read(x), b.read(y), atol, rtol))
        if on_shard:
            on_shard(i)
    return SetDiff(a.url, b.url, atol, rtol, shards, sorted(ra.keys() - rb.keys()), sorted(rb.keys() - ra.keys()))


def _compare_shard(index: int, sa: Any, sb: Any, atol: float, rtol: float) -> ShardDiff:
    import torch

    tokens_equal = bool(torch.equal(sa.tokens, sb.tokens))
    xa, xb = sa.activations, sb.activations
    n = xa.shape[0]
    per_seq = max(1, xa[0].numel()) if n else 1
    step = max(1, SLICE_VALUES // per_seq)
    max_abs, max_b, beyond = 0.0, 0.0, 0
    for start in range(0, n, step):
        x = xa[start : start + step].double()
        y = xb[start : start + step].double()
        same = (x == y) | (x.isnan() & y.isnan())
        d = torch.where(same, torch.zeros_like(x), (x - y).abs()).nan_to_num(nan=math.inf, posinf=math.inf)
        max_abs = max(max_abs, d.max().item())
        finite_b = y.abs().nan_to_num(nan=0.0, posinf=0.0)
        max_b = max(max_b, finite_b.max().item())
        beyond += int((d > atol + rtol * finite_b).sum().item())
    rel = 0.0 if max_abs == 0 else (max_abs / max_b if max_b > 0 else math.inf)
    return ShardDiff(index, False, tokens_equal, max_abs, rel, beyond)
