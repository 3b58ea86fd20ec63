"""The one order in which a set is written: each shard's bytes, then its completion record, then the manifest.

A reader counts a shard only once its record is in place (``records.Scan.is_done``) and a set only once its
manifest lists it, so a writer killed between any two writes leaves a set a rerun completes, never one that
claims what is not there. Extraction's upload and manifest, ``actcache shuffle`` and ``actcache cp`` all write
through ``commit``; each names its crash points (``crashpoints``) so the crash tests can kill it in between.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from actcache import crashpoints
from actcache.errors import Failure
from actcache.format import layout, manifest, records
from actcache.storage import leases
from actcache.storage.store import Store, parse_json


class SetChanged(Failure):
    """Another writer of the set replaced a shard that a manifest about to be written names (a run of a higher
    target completing the partial last shard of a lower one): the manifest is stale, the set is fine. Whoever built
    the manifest from a scan builds it again (``rebuilding``)."""


@dataclass(frozen=True)
class Shard:
    """One shard to commit: its bytes and its record (``stored_record``: the record's file as another store holds
    it, written verbatim instead of ``record``, as ``cp`` keeps the moments that only records carry)."""

    record: records.Record
    data: bytes | memoryview
    stored_record: bytes | None = None


@dataclass(frozen=True)
class Points:
    """The crash points reached after each write (None: no point there)."""

    shard_written: str | None = None
    record_written: str | None = None
    before_manifest: str | None = None
    manifest_written: str | None = None


NO_POINTS = Points()


def _point(name: str | None) -> None:
    if name is not None:
        crashpoints.point(name)


def commit(
    store: Store,
    set_id: str,
    shards: Iterable[Shard] = (),
    manifest_doc: dict[str, Any] | bytes | None = None,
    *,
    points: Points = NO_POINTS,
) -> None:
    """Write each of ``shards`` (bytes, then record), then ``manifest_doc`` when given: a dict is sealed and
    written (``manifest.write``), bytes are a sealed manifest copied as they are. Where this process holds a writer
    lease on the set (``storage.leases``), each write first checks it is still there: a set removed meanwhile is
    not written again."""
    for s in shards:
        leases.check(store, set_id)
        store.write_bytes(f"{set_id}/{s.record.file}", s.data)
        _point(points.shard_written)
        if s.stored_record is not None:
            store.write_bytes(f"{set_id}/{layout.record_file(s.record.index)}", s.stored_record)
        else:
            records.write_record(store, set_id, s.record)
        _point(points.record_written)
    if manifest_doc is None:
        return
    _point(points.before_manifest)
    leases.check(store, set_id)
    _check_present(store, set_id, manifest_doc)
    if isinstance(manifest_doc, bytes):
        store.write_bytes(f"{set_id}/{layout.MANIFEST}", manifest_doc)
    else:
        manifest.write(store, set_id, manifest_doc)
    try:  # again, now that it is in: an `rm` that listed the set before the manifest existed deletes all but it
        _check_present(store, set_id, manifest_doc)
    except Failure:
        store.remove([f"{set_id}/{layout.MANIFEST}"])  # a manifest over missing shards would call the set complete
        raise
    _point(points.manifest_written)


def _check_present(store: Store, set_id: str, manifest_doc: dict[str, Any] | bytes) -> None:
    """Every shard the manifest names, and its record, is in place at its size (one listing): a set removed
    (``actcache rm``) or damaged while it was written never gets a manifest that calls it complete, nor one whose
    shard another writer has replaced meanwhile (``SetChanged``)."""
    doc = manifest_doc if isinstance(manifest_doc, dict) else parse_json(manifest_doc, store.url_of(set_id))
    have = store.listing(set_id)
    gone, replaced = [], []
    for s in doc.get("shards", []):
        if not isinstance(s, dict):
            continue
        entry, recorded = have.get(str(s.get("file"))), layout.record_file(s.get("index", -1)) in have
        if entry is None or not recorded:
            gone.append(s.get("index"))
        elif entry.size != s.get("bytes"):
            replaced.append(s.get("index"))
    if gone:
        raise Failure(
            f"{store.url_of(set_id)} changed while it was written: shard {gone[0]} ({len(gone)} in all) is no "
            "longer there (removed by `actcache rm`?), so the set is left without a manifest; rerun the same command"
        )
    if replaced:
        raise SetChanged(
            f"{store.url_of(set_id)} changed while its manifest was written: another writer of the set replaced "
            f"shard {replaced[0]} ({len(replaced)} in all); rerun the same command to write the manifest again"
        )


REBUILDS = 8
"""Times a manifest is built again from a new scan while other writers of the set keep replacing its shards."""


def rebuilding(write: Callable[[], None]) -> None:
    """``write()``: scan a set, build its manifest, commit it; again from a new scan where another writer of the set
    replaced a shard meanwhile (``SetChanged``: concurrent runs of one set with different targets)."""
    for attempt in range(REBUILDS):
        try:
            write()
            return
        except SetChanged:
            if attempt == REBUILDS - 1:
                raise
            time.sleep(0.05 * (attempt + 1))  # the other writer is between its shard and its manifest
