"""Which heads and dimensions of a hook a set keeps (``--heads``, ``--dims``), checked against its shape.

``--heads`` picks entries of the head axis of hooks shaped ``(n_heads, d_head)`` (``attn.hook_z``, ``hook_q``,
``hook_k``, ``hook_v``, ``hook_result``); ``--dims`` picks entries of the last axis (neurons of ``mlp.hook_post``,
a subspace of the residual stream, or of each kept head). Both take indices and slices (``0,5,7``, ``0:64``,
``-8:``), resolved against the hook's shape into a sorted-as-given list of indices: the set key holds that list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from actcache.errors import ActcacheError, opt

_PART = re.compile(r"^(-?\d+)$|^(-?\d+)?:(-?\d+)?$")
HEAD_HOOKS = re.compile(r"attn\.hook_(z|q|k|v|result)$")


def indices(text: str, n: int, name: str, what: str) -> tuple[int, ...]:
    """``text`` (indices and slices, comma-separated) as indices into an axis of ``n``; a one-line error when out of
    range, empty or repeated."""
    out: list[int] = []
    for part in text.replace(" ", "").split(","):
        m = _PART.match(part)
        if not m:
            raise ActcacheError(f"{opt(name)} {text!r}: {part!r} is not an index or a slice (e.g. 0,5,7 or 0:64)")
        if m.group(1) is not None:
            i = int(m.group(1))
            if not -n <= i < n:
                raise ActcacheError(f"{opt(name)} {text!r}: {i} is out of range for {what} of {n} (0..{n - 1})")
            out.append(i % n)
        else:
            a, b = (int(g) if g is not None else None for g in m.group(2, 3))
            if any(v is not None and not -n <= v <= n for v in (a, b)):
                raise ActcacheError(f"{opt(name)} {text!r}: the slice {part!r} is out of range for {what} of {n}")
            got = list(range(*slice(a, b).indices(n)))
            if not got:
                raise ActcacheError(f"{opt(name)} {text!r}: the slice {part!r} is empty for {what} of {n}")
            out.extend(got)
    if len(set(out)) != len(out):
        raise ActcacheError(f"{opt(name)} {text!r} names an index twice")
    return tuple(out)


@dataclass(frozen=True)
class Selection:
    """What of a hook's per-token activation ``shape`` is kept."""

    shape: tuple[int, ...]
    """The hook's full per-token shape."""
    heads: tuple[int, ...] | None = None
    dims: tuple[int, ...] | None = None

    @property
    def kept_shape(self) -> tuple[int, ...]:
        shape = list(self.shape)
        if self.heads is not None:
            shape[0] = len(self.heads)
        if self.dims is not None:
            shape[-1] = len(self.dims)
        return tuple(shape)

    @property
    def whole(self) -> bool:
        return self.heads is None and self.dims is None

    def key_fields(self) -> dict[str, Any]:
        """The set key's fields (none for a whole hook: packed sets keep their ids)."""
        out: dict[str, Any] = {}
        if self.heads is not None:
            out["heads"] = ",".join(map(str, self.heads))
        if self.dims is not None:
            out["dims"] = ",".join(map(str, self.dims))
        return out

    def apply(self, act):
        """``act [..., prod(shape)]`` -> ``[..., prod(kept_shape)]``."""
        if self.whole:
            return act
        lead = act.shape[:-1]
        x = act.reshape(*lead, *self.shape)
        if self.heads is not None:
            x = x[..., list(self.heads), :]
        if self.dims is not None:
            x = x[..., list(self.dims)]
        return x.reshape(*lead, -1)


def select(hook: str, shape: tuple[int, ...], heads: str, dims: str) -> Selection:
    """The selection of ``--heads``/``--dims`` for ``hook`` of per-token ``shape``, checked."""
    h = d = None
    if heads.strip():
        if len(shape) != 2 or not HEAD_HOOKS.search(hook):
            raise ActcacheError(
                f"{opt('heads')} needs a hook with a head axis (attn.hook_z, hook_q, hook_k, hook_v, hook_result); "
                f"{hook} has shape {list(shape)}"
            )
        h = indices(heads, shape[0], "heads", f"the {shape[0]} heads of {hook}")
    if dims.strip():
        d = indices(dims, shape[-1], "dims", f"the last axis of {hook}")
    return Selection(tuple(shape), h, d)
