"""Copy an activation set between stores (local <-> S3 <-> ...), in the same order extraction writes it.

Shard bytes first (each checked against the manifest's sha256 before it is written), then its completion
record, then the manifest, then the set's content index entry (``format.content``), as an extraction publishes
them: an interrupted copy resumes, skipping shards the destination holds.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from actcache.errors import ActcacheError, Failure, opt
from actcache.format import content, layout, manifest, records
from actcache.format.commit import Points, Shard, commit
from actcache.format.key import SetKey, key_from_dict
from actcache.read.reader import open_set
from actcache.storage import leases
from actcache.storage.store import DamagedFile, Store, StoreRef, parse_json

_POINTS = Points(shard_written="cp.shard-written", record_written="cp.record-written")


def _same(a: str, b: str, local: bool) -> bool:
    """Whether two local paths name one folder (through links, ``..``)."""
    return local and os.path.realpath(a) == os.path.realpath(b)


@dataclass(frozen=True)
class CopyResult:
    url: str
    """The set's URL in the destination store."""
    copied: int
    skipped: int
    bytes_copied: int


@leases.releasing
def copy_set(
    src: str | StoreRef,
    dest: str | StoreRef,
    *,
    src_options: dict[str, Any] | None = None,
    dest_options: dict[str, Any] | None = None,
    src_credentials_block: str | None = None,
    dest_credentials_block: str | None = None,
    jobs: int = 4,
    verify_existing: bool = False,
    on_shard=None,
    on_total=None,
) -> CopyResult:
    """Copy the set at ``src`` (``<store>/<set_id>``) into the store ``dest``; return what was done.

    Either may be a ``StoreRef`` (options and credentials block inside), or a URL with the loose options.

    Shards already complete at the destination with the same checksum are skipped (re-hashed first with
    ``verify_existing``). At most ``jobs`` shards are held in memory at once.
    """
    if jobs < 1:
        raise ActcacheError(f"{opt('jobs')} must be at least 1, got {jobs}")
    source = open_set(StoreRef.of(src, src_options, src_credentials_block))
    target = StoreRef.of(dest, dest_options, dest_credentials_block).open()
    set_id = source.set_id
    if target.url_of(set_id) == source.url or _same(target.url_of(set_id), source.url, target.local):
        raise ActcacheError(f"{source.url} is already in {target.url!r}; give another destination store")
    if source.holds(target):
        raise ActcacheError(
            f"destination store {target.url!r} is inside the set {source.url}; give a store outside it (its parent "
            "folder holds the set already)"
        )
    target.check_writable("the destination store")
    leases.acquire(target, set_id)  # before its first look at the destination: `rm` refuses it from here on
    scan = records.scan_set(target, source.key)

    def present(r: records.Record) -> bool:
        have = scan.records.get(r.index)
        return have is not None and have.sha256 == r.sha256 and scan.is_done(r.index, r.n_seq, verify=verify_existing)

    todo = [r for r in source.records if not present(r)]
    if on_total:
        on_total(len(todo))  # the shards ``on_shard`` will count

    def stored_record(r: records.Record) -> bytes | None:
        """The source's record as stored (it holds the shard's moments, which the manifest leaves out), or None
        (then one is written from the manifest) if the stored one is gone, damaged (its seal) or disagrees."""
        rel = f"{set_id}/{layout.record_file(r.index)}"
        try:
            stored = source.store.read_bytes(rel, limit=source.bounds.record_limit)
            if records.Record.from_dict(records.check_sealed(parse_json(stored, rel), rel), source.bounds) == r:
                return stored
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            pass
        return None

    def copy_one(r: records.Record) -> int:
        source.check_stored_size(r)  # a record claiming more than a true shard of the key: named, never read
        try:
            data = source.store.read_bytes(f"{set_id}/{r.file}", size=r.bytes)
        except FileNotFoundError as e:
            source.check_current(r)  # removed or being extended since it was opened: said so, not as damage
            raise Failure(
                f"shard {r.index} of {source.url} is missing ({r.file}); the copy stopped: repair the source "
                "(`actcache verify`, then rerun its extract) and copy again"
            ) from e
        except DamagedFile as e:
            source.check_current(r)
            raise DamagedFile(
                f"shard {r.index} of {source.url} is unreadable ({e}); the copy stopped: repair the "
                "source (`actcache verify`, then rerun its extract) and copy again"
            ) from e
        if hashlib.sha256(data).hexdigest() != r.sha256:
            raise Failure(
                f"shard {r.index} of {source.url} fails its checksum; the copy stopped: "
                "repair the source (`actcache verify`, then rerun its extract) and copy again"
            )
        # the bytes, then the record, as extraction
        commit(target, set_id, [Shard(r, data, stored_record(r))], points=_POINTS)
        if on_shard:
            on_shard(r)
        return len(data)

    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="actcache-cp") as pool:
        futures = [pool.submit(copy_one, r) for r in todo]  # each reads its own shard: <= jobs in memory
        try:
            copied_bytes = sum(f.result() for f in futures)
        except BaseException:
            for f in futures:
                f.cancel()  # stop at the first failure; what was written stays valid for a resumed copy
            raise

    # The manifest last, byte for byte, unless the destination already lists more shards than the source.
    theirs = {r["index"] for r in (scan.consolidated or {}).get("shards", [])}
    if not theirs > {r.index for r in source.records}:
        try:
            raw = manifest.stored_bytes(source.store, set_id)
        except FileNotFoundError:
            raise Failure(
                f"{source.url} was removed since it was opened (`actcache rm`?): its manifest is gone; the copy "
                "stopped before its own manifest"
            ) from None
        commit(target, set_id, manifest_doc=raw)
        _index(target, set_id, parse_json(raw, source.url))
    return CopyResult(target.url_of(set_id), len(todo), len(source.records) - len(todo), copied_bytes)


def _index(target: Store, set_id: str, m: Any) -> None:
    """The copied set's content and family entries in ``target`` (after its manifest, as ``content.publish``), so
    that an extraction there reuses it for the same token ids read another way; an entry already followed is
    kept."""
    if not isinstance(m, dict) or not m.get("complete"):
        return
    cid, fid = content.stored_id(m), content.stored_family(m)
    key = key_from_dict(m["key"])  # the manifest was read and checked before the copy
    if not isinstance(key, SetKey):
        return  # a shuffled copy: no content of its own
    if cid and content.lookup(target, cid, key) is None:
        content.index(target, cid, set_id)
    if fid and content.lookup_family(target, fid, key) is None:
        content.index(target, fid, set_id)
