"""Whether several sets hold the same tokens in the same rows, so they can be read (or shuffled) as one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from actcache.errors import ActcacheError
from actcache.read.reader import ActivationSet


def _tokens_key(s: ActivationSet) -> Any:
    """What fixes which token sits in which row: the token cache's key (a shuffled copy: its source's, and the
    shuffle's seed, shard size and exclusions)."""
    key: Any = s.key  # a ShuffleKey for the rows layout, else a SetKey
    if s.layout == "rows":
        source = ((s.manifest.get("source") or {}).get("key") or {}).get("tokens")
        return source, key.seed, key.rows_per_shard, key.exclude
    return key.tokens


def check_aligned(sets: Sequence[ActivationSet]) -> None:
    """Several sets read (or shuffled) as one must hold the same tokens in the same rows: one token cache and the
    same shards; for shuffled copies, copies of such sets made with the same seed, shard size and exclusions."""
    first = sets[0]
    for s in sets[1:]:
        if s.layout != first.layout:
            copy = s.url if s.layout == "rows" else first.url
            raise ActcacheError(
                f"{copy} is a shuffled copy (layout 'rows') and the other is not; read the extracted sets together, "
                "or shuffled copies of each made by one `actcache shuffle A B ...`"
            )
        if _tokens_key(s) != _tokens_key(first):
            raise ActcacheError(
                f"{s.url} was extracted from other tokens than {first.url} (another token cache, or another shuffle); "
                "read together only sets extracted from the same tokens, e.g. by one run with --hook a,b"
            )
        if [(r.index, r.n_seq) for r in s.records] != [(r.index, r.n_seq) for r in first.records]:
            raise ActcacheError(
                f"{s.url} holds other shards than {first.url} ({len(s.records)} against {len(first.records)}); "
                "extend both to the same --max-tokens, then read them together"
            )
