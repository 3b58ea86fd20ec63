"""The content index: one set for one stream of token ids, whether the ids came from text or from a column.

A set's id is the digest of its key, and the key names the inputs (dataset, tokenizer, text or token column):
the same token ids read two ways give two ids. Once an extraction knows its token ids (``--packing none``:
``extraction.examples.prepare``; packed: its token shards, once stored), its *content key* names what the bytes
depend on: the set key with those input fields replaced by the digest of what the shards hold besides
activations (``Examples.digest``; packed: ``TokenCache.digest``, the token shards' checksums). The index maps a
content key to the set that holds its bytes, one small sealed file each::

    <store>/_content/<content_id>.json    {"content_id": ..., "set_id": ...}

An extraction whose content key is indexed reuses that set (``extraction.reuse``) instead of computing a copy.

A set also indexes its *family*: the same key with the digest of its first sequence (packed: its first token
shard; one per example: its first example) in place of the whole content, under ``content_id(key, "first:" +
digest)``. Raising ``--max-tokens`` extends a set and lowering it reads a prefix of it, which a content id of the
whole extent cannot find; a request that asks fewer sequences than a stored set of its family holds reuses it
once it has checked, shard by shard, that the set holds exactly its ids (``extraction.reuse``). The family entry
names no extent and is kept when the set is extended; the manifest names it (``FAMILY_FIELD``) to be trusted.

The entry is written after the set's complete manifest, and trusted only where that manifest is complete, names
the same content id, and has a key that differs from the looking set's only in the input fields (an entry or a
manifest edited to point at a set of another model, hook or shape is not followed: its bytes are not these). A
crash between the two leaves no entry (the set is just not reused), and an entry whose set was removed, extended
to more examples or never finished is ignored, never followed.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from actcache import crashpoints
from actcache.errors import ActcacheError
from actcache.format import layout, manifest, records
from actcache.format.key import SetKey, key_from_dict
from actcache.storage.failures import StoreUnavailable
from actcache.storage.store import Store

INPUT_FIELDS = ("dataset", "tokenizer", "text_column", "token_column", "truncate")
"""The token key's fields that say where the ids came from: the content key has the ids' digest instead."""

MANIFEST_FIELD = "content_id"
"""Where an example set's manifest (its ``examples`` object), or a packed set's (at the top), names its content id."""

FAMILY_FIELD = "content_family"
"""Where a manifest names its family id (beside ``MANIFEST_FIELD``)."""

_ID_RE = re.compile(r"^c[0-9a-f]{24}\Z")


def content_id(key: SetKey, digest: str) -> str:
    """The id of ``key`` with its input fields replaced by ``digest`` (the ids and what is stored beside them)."""
    d = _outside_inputs(key)
    blob = json.dumps({**d, "tokens": {**d["tokens"], "content": digest}}, sort_keys=True, separators=(",", ":"))
    return "c" + hashlib.sha256(blob.encode()).hexdigest()[:24]


def _outside_inputs(key: SetKey) -> dict[str, Any]:
    """``key``'s fields but the input ones: what two sets holding the same bytes share."""
    d = key.to_dict()
    return {**d, "tokens": {k: v for k, v in d["tokens"].items() if k not in INPUT_FIELDS}}


def family_id(key: SetKey, first: str) -> str:
    """The id of ``key``'s family: its content id with the digest of its first sequence (``first``) as content."""
    return content_id(key, "first:" + first)


def lookup_family(store: Store, fid: str, key: SetKey) -> tuple[str, dict[str, Any]] | None:
    """(set id, manifest) of the complete set family ``fid``'s entry names, when its manifest names that family and
    its key is of the same bytes as ``key`` (the looking set's)."""
    set_id = named_set(store, fid)
    if set_id is None:
        return None
    m = _complete(store, set_id, key)
    return (set_id, m) if m is not None and stored_family(m) == fid else None


def named_set(store: Store, cid: str) -> str | None:
    """The set id entry ``cid`` names, or None (none, or not sealed as actcache wrote it)."""
    rel = layout.content_entry(cid)
    try:
        entry = records.check_sealed(store.read_json(rel, limit=records.RECORD_BASE), rel)
    except (FileNotFoundError, ValueError):
        return None
    set_id = entry.get("set_id")
    return set_id if entry.get("content_id") == cid and isinstance(set_id, str) else None


def _complete(store: Store, set_id: str, key: SetKey) -> dict[str, Any] | None:
    """Set ``set_id``'s manifest where it is complete and its key differs from ``key`` in the input fields alone: the
    ids a manifest states are its writer's word, its key is checked (the set id is its digest). An entry or manifest
    edited to point at a set of another model, hook or shape is not followed: its bytes are not these."""
    try:
        m = manifest.read(store, set_id)
    except StoreUnavailable:
        raise  # the store failed, not the entry
    except ActcacheError:
        return None  # removed, damaged or unfinished: computed again, and the entry replaced
    if not m.get("complete"):
        return None
    held = key_from_dict(m["key"])
    return m if isinstance(held, SetKey) and _outside_inputs(held) == _outside_inputs(key) else None


def lookup(store: Store, cid: str, key: SetKey) -> str | None:
    """The complete set holding the bytes of content ``cid`` of a set keyed ``key``, or None (no entry, or one that
    is not trusted: its set's manifest is not complete, names another content id, or has a key of other bytes)."""
    set_id = named_set(store, cid)
    if set_id is None:
        return None
    m = _complete(store, set_id, key)
    return set_id if m is not None and stored_id(m) == cid else None


def index(store: Store, cid: str, set_id: str) -> None:
    """Point content ``cid`` at ``set_id``: only once ``set_id``'s manifest is written and complete."""
    if not _ID_RE.match(cid):
        raise ValueError(f"not a content id: {cid!r}")
    store.write_json(layout.content_entry(cid), records.sealed({"content_id": cid, "set_id": set_id}))


def drop(store: Store, cid: str, set_id: str) -> None:
    """Remove content ``cid``'s entry where it points at ``set_id`` (whose content has changed since: extended)."""
    rel = layout.content_entry(cid)
    try:
        entry = records.check_sealed(store.read_json(rel, limit=records.RECORD_BASE), rel)
    except (FileNotFoundError, ValueError):
        return
    if entry.get("set_id") == set_id:
        store.remove([rel])


def publish(
    store: Store, set_id: str, m: dict[str, Any], cid: str | None, previous: dict[str, Any] | None, points: Any
) -> None:
    """Manifest ``m`` of ``set_id`` (left as stored when it says what ``previous`` said), then, once the set is
    complete, the entry ``cid`` -> ``set_id`` (after the manifest: the index never points at an unfinished set),
    and ``previous``'s own entry dropped when the content changed (an extended set)."""
    from actcache.format.commit import commit

    if not manifest.unchanged(previous, m):
        commit(store, set_id, manifest_doc=m, points=points)
    key = SetKey.from_dict(m["key"])
    if cid and m["complete"] and lookup(store, cid, key) is None:
        crashpoints.point("content.before-index")
        index(store, cid, set_id)
    fid = stored_family(m)
    if fid and m["complete"]:  # the family's entry names its set that holds the most sequences
        held = lookup_family(store, fid, key)
        if held is None or (held[0] != set_id and held[1].get("n_tokens", 0) < m.get("n_tokens", 0)):
            index(store, fid, set_id)
    old = stored_id(previous)
    if old and old != cid:
        drop(store, old, set_id)


def stored_id(m: dict[str, Any] | None) -> str | None:
    """The content id a manifest holds: at its top (packed sets) or in its ``examples`` part; None if none or not
    a content id."""
    if not m:
        return None
    cid = m.get(MANIFEST_FIELD) or (m.get("examples") or {}).get(MANIFEST_FIELD)
    return cid if isinstance(cid, str) and _ID_RE.match(cid) else None  # (a forged one names no other file)


def stored_family(m: dict[str, Any] | None) -> str | None:
    """The family id a manifest names (beside its content id), or None."""
    if not m:
        return None
    fid = m.get(FAMILY_FIELD) or (m.get("examples") or {}).get(FAMILY_FIELD)
    return fid if isinstance(fid, str) and _ID_RE.match(fid) else None
