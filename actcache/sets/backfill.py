"""A content id for a set made before there were any (before 0.5.0), from what the set stores.

An extraction gives a set its content id (``format.content``) when it writes the manifest; a set written before
then has none, and is not found for the same token ids read another way. ``actcache verify`` of such a set, once
every shard has passed its checksum, computes the id exactly as the writer would have, and publishes it: the
manifest with its ``content_id``, then the index entry (``content.publish``, in that order).

Computed from bytes just verified, never from the request of a run: an example set's digest from its own shards
(ids, lengths, dataset rows, kept columns: what ``Examples.digest`` hashes), a packed set's from the checksums of
the token shards it was computed from (``TokenCache.digest``, as ``stages.write_manifest``). A packed set whose
token cache is gone (a copied set) gets none. Only a complete set is indexed, as by extraction.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from actcache.errors import ActcacheError, Failure
from actcache.format import content, manifest
from actcache.format.commit import Points
from actcache.format.key import SetKey

if TYPE_CHECKING:
    from actcache.read.reader import ActivationSet

MANIFEST_POINTS = Points(before_manifest="manifest.before-write", manifest_written="manifest.written")
"""The crash points of a manifest write, as extraction names them (no torch is imported for a packed set)."""


def content_of(s: ActivationSet) -> str | None:
    """The content id the extraction that wrote set ``s`` gives it today, or None where that cannot be known."""
    if not isinstance(s.key, SetKey) or not s.manifest.get("complete"):
        return None
    digest = _examples_digest(s) if s.manifest.get("examples") else _packed_digest(s)
    return None if digest is None else content.content_id(s.key, digest)


def backfill(s: ActivationSet) -> str | None:
    """Give set ``s`` (its shards verified) the content and family ids and index entries it lacks; return the
    content id, or None when it has both already, they cannot be known, or the store takes no writes."""
    # A 0.5.0 set has its content id but no family (``content.family_id``): it gets its family too.
    if content.stored_family(s.manifest) or not isinstance(s.key, SetKey) or not s.manifest.get("complete"):
        return None
    try:
        s.store.check_writable()
    except ActcacheError:
        return None  # a read-only store (a public bucket): verified, left as it is
    cid = content_of(s)
    if cid is None:
        return None
    first = _examples_digest(s, 1) if s.manifest.get("examples") else _packed_first(s)
    ids = {content.MANIFEST_FIELD: cid} | ({content.FAMILY_FIELD: content.family_id(s.key, first)} if first else {})
    m: dict[str, Any] = dict(s.manifest)
    if m.get("examples"):
        m["examples"] = {**m["examples"], **ids}
    else:
        m |= ids
    # Verifying took as long as reading every shard: a run may have extended the set meanwhile, and writing the
    # manifest verified would drop its new shards from it. Only a manifest still as verified is given the ids.
    try:
        current = manifest.read(s.store, s.set_id)
    except ActcacheError:
        return None
    if not manifest.unchanged(current, s.manifest):
        return None
    content.publish(s.store, s.set_id, m, cid, s.manifest, MANIFEST_POINTS)  # the manifest, then the entry
    s.manifest = m
    return cid


def _packed_digest(s: ActivationSet) -> str | None:
    from actcache.extraction.tokens import ShardWork, TokenCache

    assert isinstance(s.key, SetKey)
    cache = TokenCache(s.store, s.key.tokens)
    return cache.digest(ShardWork(r["index"], r["n_seq"]) for r in s.manifest["shards"])


def _packed_first(s: ActivationSet) -> str | None:
    from actcache.extraction.tokens import TokenCache

    assert isinstance(s.key, SetKey)
    return TokenCache(s.store, s.key.tokens).first_digest()


def _examples_digest(s: ActivationSet, limit: int | None = None) -> str:
    """``Examples.digest`` of the examples the set's shards hold (its first ``limit`` when given), read shard by
    shard (each checked again)."""
    import torch

    from actcache.extraction.examples import digest
    from actcache.read import example_rows

    types = example_rows.column_types(s)
    lengths: list[int] = []
    index: list[int] = []
    ids: list[bytes] = []
    columns: dict[str, list[Any]] = {c: [] for c in types}
    for rec in sorted(s.records, key=lambda r: r.index):
        if limit is not None and len(lengths) >= limit:
            break
        data = s.store.read_mapped(f"{s.set_id}/{rec.file}", size=rec.bytes)
        if hashlib.sha256(data).hexdigest() != rec.sha256:
            raise Failure(f"shard {rec.index} of {s.url} fails its checksum; rerun the extraction to repair it")
        t = example_rows.decode(s, rec, data)
        n = len(t["lengths"]) if limit is None else min(len(t["lengths"]), limit - len(lengths))
        own = t["lengths"][:n].tolist()
        lengths += own
        index += t["example_index"][:n].tolist()
        # int64, as the writer hashes each example's ids (stored one example after another)
        ids.append(t["tokens"][: sum(own)].to(torch.int64).numpy().tobytes())
        for c, kind in types.items():
            if kind == "str":
                raw, o = t[f"column.{c}.utf8"].numpy().tobytes(), t[f"column.{c}.offsets"].tolist()
                columns[c] += [raw[o[i] : o[i + 1]].decode() for i in range(n)]
            else:
                columns[c] += t[f"column.{c}"][:n].tolist()
    return digest(types, lengths, ids, index, columns)


def holds_examples(s: ActivationSet, n: int, expected: str) -> bool:
    """Whether example set ``s``'s first ``n`` examples are those ``Examples.digest`` ``expected`` names (read from
    its shards: a request for fewer examples than a set of its family holds, ``extraction.reuse``)."""
    info = s.manifest.get("examples") or {}
    return info.get("n_examples", 0) >= n and _examples_digest(s, n) == expected
