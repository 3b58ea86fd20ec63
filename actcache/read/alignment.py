"""Whether several sets hold the same tokens in the same rows, so they can be read (or shuffled) as one."""

from __future__ import annotations

import dataclasses
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


_WHAT = {
    "dataset": "another dataset (or revision, or files)",
    "tokenizer": "another tokenizer",
    "text_column": "another --text-column",
    "context_size": "another --context-size",
    "prepend_bos": "another --prepend-bos",
    "separator": "another --separator",
    "packing": "another --packing",
    "truncate": "another --truncate",
    "token_column": "another --token-column",
    "format_version": "another actcache format version",
}


def _why_other(a: ActivationSet, b: ActivationSet) -> str:
    """What differs between the tokens of ``a`` and ``b``, and how to get sets that read together."""
    if a.layout == "rows":
        return (
            "another shuffle (another source, seed, shard size or exclusions); shuffle them together, "
            "`actcache shuffle A B ...`"
        )
    ka, kb = _tokens_key(a), _tokens_key(b)  # TokensKeys: neither is a shuffled copy
    differ = [f.name for f in dataclasses.fields(ka) if getattr(ka, f.name) != getattr(kb, f.name)]
    if differ == ["seqs_per_shard"]:
        # Each run sizes its shards by its own widest hook: two runs of hooks of other widths (mlp_in and mlp.hook_post,
        # or two models of other widths) cut the same token stream into other shards.
        small, large = sorted((a, b), key=lambda x: _tokens_key(x).shard_tokens)
        n = _tokens_key(small).shard_tokens
        return (
            f"the same tokens, cut into shards of {ka.shard_tokens} and {kb.shard_tokens} (a run without "
            f"--shard-tokens sizes them by its widest hook); cut {large.url} as {small.url} is, `actcache extract "
            f"--like {large.url} --store {large.url.rsplit('/', 1)[0]} --shard-tokens {n}`, or extract the hooks in "
            "one run"
        )
    what = ", ".join(_WHAT.get(name, name) for name in differ if name != "seqs_per_shard")
    return f"{what}; read together only sets extracted from the same tokens, e.g. by one run with --hook a,b"


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
            raise ActcacheError(f"{s.url} was extracted from other tokens than {first.url}: {_why_other(first, s)}")
        if [(r.index, r.n_seq) for r in s.records] != [(r.index, r.n_seq) for r in first.records]:
            raise ActcacheError(
                f"{s.url} holds other shards than {first.url} ({len(s.records)} against {len(first.records)}); "
                "extend both to the same --max-tokens, then read them together"
            )
