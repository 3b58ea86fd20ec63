"""Reuse a set that already holds the same token ids, read another way (text, or ``--token-column``).

The set key names where the ids came from, so the same ids read from text and from a column of token ids give
two set ids. Once the ids are known (``examples.prepare`` with ``--packing none``; the token shards, after the
tokenize stage, for packed sequences), each set's content id (``format.content``) is looked up in the store's
content index: a set found there holds exactly the bytes this one would, and the plan reports it
instead of computing a copy (``HookSet.stored_as``).

A request for fewer sequences than a stored set of the same ids holds (a lower ``--max-tokens``, which the text's
own rerun answers from its set) has another content id: it finds that set by its family (``content.family_id``)
and reuses it once it has checked that the set holds each of its shards (``holds``). More than a set holds is
computed alone: that set's id names another input, and is never extended with ids read from this one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from actcache.extraction.tokens import ShardRange, TokenCache
from actcache.format import content, records
from actcache.format.key import SetKey

if TYPE_CHECKING:
    from actcache.extraction.examples import Examples
    from actcache.extraction.plan import Plan


def stored(plan: Plan, ex: Examples) -> Plan:
    """``plan`` with each set whose content another complete set holds marked ``stored_as`` that set (all its
    shards done); the plan unchanged where there is none."""
    from actcache.read.reader import open_set
    from actcache.sets.backfill import holds_examples

    exact = ShardRange(len(ex.ids), plan.tokens_key.seqs_per_shard)  # the examples are known: so are the shards
    digest = ex.digest()

    def holds(set_id: str, m: dict[str, Any]) -> bool:
        return holds_examples(open_set(plan.store_ref.child(set_id)), len(ex.ids), digest)

    return _marked(plan, exact, digest, ex.first_digest(), holds)


def packed(plan: Plan, scan: records.Scan | None = None) -> Plan:
    """The same for packed sequences, once their token shards are stored (after the tokenize stage, or a plan
    that finds them): the content is the token shards' digest (``TokenCache.digest``)."""
    cache = plan.token_cache()
    scan = scan or cache.scan()
    shards = cache.plan(plan.config.target_seqs, scan)
    digest = cache.digest(shards, scan) if shards.known else None
    if digest is None:
        return plan
    ours = scan.records

    def holds(set_id: str, m: dict[str, Any]) -> bool:
        """Whether set ``set_id`` (manifest ``m``) holds each of our shards, computed from the same token shard
        (equal checksums: equal ids) of its own token cache."""
        theirs = TokenCache(plan.store, SetKey.from_dict(m["key"]).tokens).scan().records
        held = {r["index"]: r["n_seq"] for r in m["shards"]}
        return all(
            w.index in ours
            and w.index in theirs
            and ours[w.index].sha256 == theirs[w.index].sha256
            and held.get(w.index, 0) >= w.n_seq
            for w in shards
        )

    return _marked(plan, shards, digest, cache.first_digest(scan), holds)


def _marked(
    plan: Plan, exact: ShardRange, digest: str, first: str | None, holds: Callable[[str, dict[str, Any]], bool]
) -> Plan:
    """``plan`` with each set found (by its whole content, or in its family holding at least ``exact``) reused."""
    store = plan.store
    found = {}
    for s in plan.sets:
        if all(w in s.done for w in exact):
            continue
        other = content.lookup(store, content.content_id(s.key, digest), s.key)
        if other is None and first is not None:
            # Fewer sequences than a set of its family holds (a lower --max-tokens), checked shard by shard.
            family = content.lookup_family(store, content.family_id(s.key, first), s.key)
            if family is not None and family[0] != s.set_id and holds(*family):
                other = family[0]
        if other is not None and other != s.set_id:
            found[s.set_id] = other
    if not found:
        return plan
    sets = tuple(
        dataclasses.replace(s, done=frozenset(exact), stored_as=found[s.set_id])
        if s.set_id in found
        else dataclasses.replace(s, done=frozenset(records.scan_set(store, s.key).done_of(exact)))
        for s in plan.sets
    )
    return dataclasses.replace(plan, sets=sets, shards=exact)
