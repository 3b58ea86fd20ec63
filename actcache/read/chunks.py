"""A piece of a shard, read: the tensors (views of the bytes read) a batch is assembled from."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class _Chunk:
    """One piece, read: the shard's tensors (views of the bytes read) and which of its rows the piece takes."""

    acts: list[torch.Tensor]
    """``[rows in the shard, d]`` of each set read (one, or several row-aligned sets)."""
    tokens: torch.Tensor | None
    positions: torch.Tensor | None
    rows: slice | torch.Tensor
    """A slice of the shard's rows, or their indices (when rows are excluded)."""
    n: int
    columns: dict[str, torch.Tensor] = field(default_factory=dict)
    """An example set's kept columns, one value per row (``column.NAME``)."""

    def column(self, name: str) -> torch.Tensor:
        return {"tokens": self.tokens, "positions": self.positions, **self.columns}[name]  # type: ignore[return-value]

    def take(self, t: torch.Tensor, a: int, b: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``[a, b)`` of the piece from ``t``: a view for a slice, else gathered (into ``out`` if given)."""
        if isinstance(self.rows, slice):
            return t[self.rows.start + a : self.rows.start + b]
        return torch.index_select(t, 0, self.rows[a:b], out=out) if out is not None else t[self.rows[a:b]]

    def copy(self, t: torch.Tensor, a: int, b: int, dst: torch.Tensor) -> None:
        """``dst[:] = `` rows ``[a, b)`` of the piece from ``t`` (same dtype), in one pass."""
        if isinstance(self.rows, slice):
            dst.copy_(self.take(t, a, b))
        else:
            self.take(t, a, b, out=dst)
