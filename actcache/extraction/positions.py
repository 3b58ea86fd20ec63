"""Which rows of each example a set stores (``--positions``): all, last, first, mean, or indices and slices.

``last``, ``first`` and ``mean`` are over the example's own tokens: the prepended BOS is left out (it is the same
token in every example, and its activations are outliers that would dominate a mean). Indices and slices count
positions of the sequence as fed to the model (BOS, when prepended, is position 0); negative ones count from the
example's last token. A slice must name a fixed number of positions (``-4:``, ``0:8``, ``-6:-2``), so every
example stores the same number of rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from actcache.errors import ActcacheError, opt

NAMED = ("all", "last", "first", "mean")
_INT = r"-?\d+"
_ITEM = re.compile(rf"^(?:({_INT})|({_INT})?:({_INT})?)$")


@dataclass(frozen=True)
class Positions:
    """A parsed ``--positions``: ``kind`` is one of ``NAMED`` or ``list`` (then ``items`` holds its parts)."""

    kind: str
    items: tuple[tuple[int | None, int | None, bool], ...] = ()
    """(start, stop, is_slice); a single index ``i`` is (i, None, False)."""

    @property
    def text(self) -> str:
        """The canonical spelling: what the set key holds."""
        if self.kind != "list":
            return self.kind
        return ",".join(
            f"{'' if a is None else a}:{'' if b is None else b}" if is_slice else str(a)
            for a, b, is_slice in self.items
        )

    def n_rows(self, context_size: int) -> int:
        """Rows stored per example."""
        if self.kind == "all":
            return context_size
        if self.kind in ("last", "first", "mean"):
            return 1
        return sum(1 if not s else _slice_count(a, b) for a, b, s in self.items)

    def reach(self) -> tuple[int, int]:
        """(tokens needed from the start, tokens needed from the end): an example shorter than either is refused."""
        head = tail = 0
        for a, b, is_slice in self.items:
            if not is_slice:
                assert a is not None  # an index always has one
                head, tail = (max(head, a + 1), tail) if a >= 0 else (head, max(tail, -a))
            elif a is None or a >= 0:
                assert b is not None  # ``parse``: a slice from the start has both ends
                head = max(head, b)
            else:
                tail = max(tail, -a)
        return head, tail

    def indices(self, length: int, bos: bool) -> list[int]:
        """Positions of one example of ``length`` tokens (BOS included when ``bos``), for kinds other than
        all and mean; checked by the caller with ``reach`` first."""
        if self.kind == "last":
            return [length - 1]
        if self.kind == "first":
            return [1 if bos and length > 1 else 0]
        out: list[int] = []
        for a, b, is_slice in self.items:
            if not is_slice:
                assert a is not None  # an index always has one
                out.append(a if a >= 0 else length + a)
            else:
                out.extend(range(*slice(a, b).indices(length)))
        return out


def _slice_count(a: int | None, b: int | None) -> int:
    a = 0 if a is None else a
    if b is None:
        return -a
    return b - a


def parse(text: str, context_size: int) -> Positions:
    """``--positions`` checked against ``context_size``: a one-line error for anything else."""
    t = (text or "").strip().replace(" ", "")
    if t in NAMED:
        return Positions(t)
    items: list[tuple[int | None, int | None, bool]] = []
    for part in t.split(","):
        m = _ITEM.match(part)
        if not m:
            raise ActcacheError(
                f"{opt('positions')} {text!r}: {part!r} is not a position; use all, last, first, mean, or indices "
                "and slices such as 0,-1 or -4:"
            )
        if m.group(1) is not None:
            i = int(m.group(1))
            if not -context_size <= i < context_size:
                raise ActcacheError(
                    f"{opt('positions')} {text!r}: position {i} is out of range for {opt('context_size')} "
                    f"{context_size} (use {-context_size}..{context_size - 1})"
                )
            items.append((i, None, False))
            continue
        a = int(m.group(2)) if m.group(2) is not None else None
        b = int(m.group(3)) if m.group(3) is not None else None
        a0 = 0 if a is None else a
        fixed = (a0 >= 0 and b is not None and b >= 0) or (a0 < 0 and (b is None or b < 0))
        if not fixed:
            raise ActcacheError(
                f"{opt('positions')} {text!r}: the slice {part!r} does not name a fixed number of positions; "
                "use both ends from the start (0:8) or from the end (-4:, -6:-2)"
            )
        n = _slice_count(a, b)
        if n < 1 or max(abs(a0), abs(b or 0)) > context_size:
            raise ActcacheError(
                f"{opt('positions')} {text!r}: the slice {part!r} is empty or out of range for "
                f"{opt('context_size')} {context_size}"
            )
        items.append((a, b, True))
    return Positions("list", tuple(items))
