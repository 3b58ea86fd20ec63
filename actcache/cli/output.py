"""How commands print: JSON documents, the summary-then-result ending, sizes, tables and warnings about a set."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

from actcache import console


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2))


def _done(summary: str, result: Any, where: str, json_output: bool) -> int:
    """How a command that writes ends: what it did on stderr, then the result as JSON or where it is (stdout)."""
    print(summary, file=sys.stderr)
    if json_output:
        _print_json(dataclasses.asdict(result))
    else:
        print(where)
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _warn_non_finite(s: Any) -> None:
    """One warning line on stderr when the set holds NaN/Inf values, with what to do."""
    line = s.non_finite()
    if line:
        print(f"actcache: warning: {s.url}: {line}", file=sys.stderr)


def _warn_mixed(s: Any) -> None:
    """One warning line when the set's shards were written by different software or devices."""
    mixed = s.environments()
    if mixed:
        print(
            f"actcache: warning: {s.url}: its shards were computed in different environments (numerics may "
            f"differ in the last bits): {'; '.join(mixed.values())}",
            file=sys.stderr,
        )


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    rows = [tuple(console.printable(c) for c in r) for r in rows]  # fields of a set are whoever wrote it
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _ranges(indices: list[int]) -> str:
    out, start = [], None
    for i, x in enumerate(indices):
        start = x if start is None else start
        if i + 1 == len(indices) or indices[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)
