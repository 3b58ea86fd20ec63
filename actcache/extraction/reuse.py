"""Reuse a set that already holds the same token ids, read another way (text, or ``--token-column``).

The set key names where the ids came from, so the same ids read from text and from a column of token ids give
two set ids. Once the ids are known (``examples.prepare`` with ``--packing none``; the token shards, after the
tokenize stage, for packed sequences), each set's content id (``format.content``) is looked up in the store's
content index: a set found there holds exactly the bytes this one would, and the plan reports it
instead of computing a copy (``HookSet.stored_as``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from actcache.extraction.tokens import ShardRange
from actcache.format import content, records

if TYPE_CHECKING:
    from actcache.extraction.examples import Examples
    from actcache.extraction.plan import Plan


def stored(plan: Plan, ex: Examples) -> Plan:
    """``plan`` with each set whose content another complete set holds marked ``stored_as`` that set (all its
    shards done); the plan unchanged where there is none."""
    exact = ShardRange(len(ex.ids), plan.tokens_key.seqs_per_shard)  # the examples are known: so are the shards
    return _marked(plan, exact, ex.digest())


def packed(plan: Plan, scan: records.Scan | None = None) -> Plan:
    """The same for packed sequences, once their token shards are stored (after the tokenize stage, or a plan
    that finds them): the content is the token shards' digest (``TokenCache.digest``)."""
    cache = plan.token_cache()
    scan = scan or cache.scan()
    shards = cache.plan(plan.config.target_seqs, scan)
    digest = cache.digest(shards, scan) if shards.known else None
    return plan if digest is None else _marked(plan, shards, digest)


def _marked(plan: Plan, exact: ShardRange, digest: str) -> Plan:
    store = plan.store
    found = {}
    for s in plan.sets:
        if all(w in s.done for w in exact):
            continue
        other = content.lookup(store, content.content_id(s.key, digest), s.key)
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
