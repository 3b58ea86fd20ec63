"""The ``normalize`` option: the (factor, offset) vectors a batch is scaled by, from a set's statistics."""

from __future__ import annotations

import math
from typing import Any

import torch

from actcache.errors import ActcacheError
from actcache.read.reader import ActivationSet

NORMALIZE = ("scale", "standardize")


def _normalizer(
    s: ActivationSet, normalize: str, stats: dict[str, Any] | None, exclude: tuple[int, ...], drop_bos: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(factor, offset) vectors in float32: batch = rows * factor (+ offset), from ``stats``, those of the rows
    kept (see ``moments.kept_stats``)."""
    if not s.manifest.get("stats"):
        raise ActcacheError(
            f"set {s.url} has no normalisation statistics; compute them with "
            f"`actcache stats {s.url}`, then pass normalize={normalize!r} again"
        )
    if not stats:
        groups = (s.manifest.get("moments") or {}).get("by_token")
        if not isinstance(groups, dict):
            raise ActcacheError(
                f"set {s.url} has no statistics without the rows this dataset leaves out (its manifest predates "
                f"moments by token); add them with `actcache stats {s.url}`, then pass normalize={normalize!r} again"
            )
        untracked = sorted(set(exclude) - set(groups.get("ids") or []))
        raise ActcacheError(
            f"normalize={normalize!r} with exclude_tokens {untracked}: the set's statistics track only its special "
            f"tokens {groups.get('ids')}; write a copy without those rows (with its own statistics) by "
            f"`actcache shuffle {s.url} --exclude-ids {','.join(map(str, untracked))}` and read that"
        )
    try:
        if normalize == "scale":
            scale = float(stats["scale"])
            if not math.isfinite(scale) or scale <= 0:
                raise ValueError(f"scale {scale}")
            return torch.full((s.d,), scale, dtype=torch.float32), None
        mean = torch.tensor(stats["mean"], dtype=torch.float64)
        var = torch.tensor(stats["var"], dtype=torch.float64)
        if mean.shape != (s.d,) or var.shape != (s.d,) or not bool(torch.isfinite(mean).all() & (var >= 0).all()):
            raise ValueError(f"mean/var of shapes {list(mean.shape)}/{list(var.shape)}, expected [{s.d}]")
    except (KeyError, TypeError, ValueError) as e:
        raise ActcacheError(
            f"the statistics in the manifest of {s.url} are malformed ({e}); recompute them with "
            f"`actcache stats {s.url}`"
        ) from None
    std = var.sqrt()
    inv = torch.where(std > 0, 1 / std, torch.ones_like(std))
    return inv.float(), (-mean * inv).float()
