"""What a store holds: its sets, each with a state, and its token caches.

One listing of the store's root, then one manifest read per set (a listing of the set only where the
manifest is missing). The field names of ``SetEntry`` are
those of ``actcache ls --json`` (see README, "Scripting").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from actcache.errors import ActcacheError
from actcache.format import content, layout, manifest
from actcache.format.key import SetKey, key_from_dict
from actcache.storage.failures import StoreUnavailable
from actcache.storage.store import Store

COMPLETE, PARTIAL, INCOMPLETE, DAMAGED = "complete", "partial", "incomplete", "damaged"
INTERRUPTED = "incomplete (interrupted run)"
"""How ls and show name a set whose manifest is below its target: a run (or a fan-out partition) ended before
it, so the same request finishes it; ``actcache ls --json`` says ``incomplete`` with the command in ``detail``."""


def finish_command(set_url: str, store_url: str) -> str:
    """The command that finishes an interrupted set: its own settings and target (``--like``), computing only what
    is missing."""
    return f"actcache extract --like {set_url} --store {store_url}"


def interrupted_detail(m: dict[str, Any], set_url: str, store_url: str) -> str:
    return (
        f"interrupted run: {m['n_tokens']} of {m.get('target_tokens')} tokens stored; finish it with "
        f"`{finish_command(set_url, store_url)}`"
    )


@dataclass(frozen=True)
class SetEntry:
    set_id: str
    url: str
    state: str
    """complete: its manifest reaches its target; incomplete: a manifest below its target (a run or a fan-out
    partition ended before it: ``detail`` gives the command that finishes it), or no manifest (an extraction
    running or killed before its end, or an interrupted ``rm``); damaged: a manifest this version cannot read
    (``detail`` says why). (``partial``, a manifest below its target, is no longer reported: that is an
    interrupted run.)"""
    n_shards: int
    """Shards with a completion record (for an incomplete set) or listed in the manifest."""
    bytes: int
    model: str | None = None
    hook: str | None = None
    n_tokens: int | None = None
    target_tokens: int | None = None
    dtype: str | None = None
    codec: str | None = None
    tokens_id: str | None = None
    """The token cache (``<store>/_tokens/<tokens_id>``) the set was extracted from (none for a shuffled copy)."""
    layout: str | None = None
    """``rows`` for a shuffled copy (``actcache shuffle``); None for an extracted set."""
    non_finite: dict[str, int] | None = None
    """NaN and Inf values in the set and the number of shards holding any (``{"nan", "inf", "shards"}``)."""
    detail: str | None = None
    content_id: str | None = None
    """One sequence per example: the id of its token ids and what is stored beside them (``format.content``),
    the same whether they were read from text or from --token-column; sets with the same content id hold the same
    bytes."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def is_set_id(name: str) -> bool:
    """A set's folder name (token caches have the same form with a leading ``t``, under ``_tokens``)."""
    return bool(layout.SET_ID_RE.match(name)) and not name.startswith("t")


def set_ids(store: Store) -> list[str]:
    return [name for name in store.list_dirs() if is_set_id(name)]


def token_cache_ids(store: Store) -> list[str]:
    return [name for name in store.list_dirs(layout.TOKENS_ROOT) if layout.SET_ID_RE.match(name)]


def is_set_file(rel: str) -> bool:
    """Whether ``rel`` (relative to a set's folder) is one of the files a set consists of, or a writer's temp file."""
    temp = layout.parse_temp(rel)
    return layout.is_set_file(temp[0] if temp else rel)


def describe_set(store: Store, set_id: str) -> SetEntry | None:
    """The set's entry, or None where its folder holds no file at all (an ``rm`` that ended before removing it)."""
    url = store.url_of(set_id)
    try:
        m = manifest.read(store, set_id)
    except StoreUnavailable:
        raise  # the store failed, not the set
    except manifest.NoManifest:
        files = store.listing(set_id)
        if not files:
            return None
        recorded = [rel for rel in files if layout.parse_record_file(rel) is not None]
        nbytes = sum(f.size for rel, f in files.items() if layout.parse_shard_file(rel) is not None)
        return SetEntry(
            set_id,
            url,
            INCOMPLETE,
            len(recorded),
            nbytes,
            detail="no manifest.json: an extraction in progress or interrupted (rerun it to finish), "
            "or an interrupted `actcache rm` (rerun it)",
        )
    except ActcacheError as e:  # a manifest, unreadable (also a link or FIFO, which listings leave out)
        return SetEntry(set_id, url, DAMAGED, 0, sum(f.size for f in store.listing(set_id).values()), detail=str(e))
    key = key_from_dict(m["key"])  # manifest.read checked it
    tokens_id = key.tokens.id if isinstance(key, SetKey) else None  # a shuffled copy reads its source, not tokens
    done = bool(m.get("complete"))
    return SetEntry(
        set_id,
        url,
        COMPLETE if done else INCOMPLETE,
        len(m["shards"]),
        m["bytes"],
        model=m["model"]["name"],
        hook=m["hook"],
        n_tokens=m["n_tokens"],
        target_tokens=m.get("target_tokens"),
        dtype=m["dtype"],
        codec=m["codec"],
        tokens_id=tokens_id,
        layout=m.get("layout"),
        non_finite=manifest.non_finite(m["shards"]),
        detail=None if done else interrupted_detail(m, url, store.url),
        content_id=content.stored_id(m),
    )


def list_sets(store: Store) -> list[SetEntry]:
    """Every set in ``store``, by id."""
    return [e for e in (describe_set(store, i) for i in set_ids(store)) if e is not None]
