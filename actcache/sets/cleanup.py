"""Removing a set, and collecting what no set needs: dead writers' temp files and unused token caches.

Both run in an order that a kill at any point cannot turn into a set that looks complete:

- ``remove_set`` deletes the set's content index entries (``format.content``), then the manifest (the set is
  then ``incomplete`` for ``ls``, and no reader opens it), then the completion records (no shard counts as
  done), then the shards, then the empty folder. An interrupted removal is finished by running it again; an
  extraction of the same set rerun in between recomputes what is gone and is byte for byte what it was.
- ``find_garbage`` lists, ``collect`` deletes: temp files of writers that no longer run (this host's, by
  pid) or that are older than a threshold (another host's), S3 multipart uploads never completed and older
  than the threshold (their parts are stored and billed, yet invisible to listings), and token caches
  (``_tokens/<id>``) that no set's manifest names. A set's shards and records are never garbage. While a
  set has no manifest (an extraction running), token caches are all kept: which one it reads is not known.
  A token cache written to within the threshold, or holding a temp file of a live writer of this host, is kept
  too: an extraction whose set folder does not exist yet may be writing or reading it. Whatever ``--older-than``
  says, a multipart upload into a set that a live writer holds a lease on (``storage.leases``), and another
  host's temp file while that host holds a live lease in the store, are kept.

``rm`` refuses a set that a live writer holds a lease on (``storage.leases``): an extraction, ``cp`` or ``shuffle``
writing it would write half of it again.

Both stay inside the store: nothing below a symlink is deleted or even listed (``Store.symlink_in``), and only
files whose names actcache's layout gives, where actcache writes them (``layout.is_store_file``): also the S3
uploads it aborts. On an object store a folder is a key prefix: an object named like a set is not one, and the
zero-byte folder markers that consoles write are removed with the folder they mark, as empty folders are locally.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from actcache import crashpoints
from actcache.errors import ActcacheError, Failure
from actcache.format import layout
from actcache.sets import inventory
from actcache.storage import leases
from actcache.storage.store import Entry, Store, Upload

TEMP_FILE, UPLOAD, TOKEN_CACHE, LEASE, CONTENT_ENTRY = "temp-file", "upload", "token-cache", "lease", "content-entry"


def removal_order(files: dict[str, Entry]) -> list[list[str]]:
    """A set's (or token cache's) files in the order they are deleted: consolidated file, records, the rest."""
    consolidated = [r for r in files if r in (layout.MANIFEST, "index.json")]
    recs = [r for r in files if layout.parse_record_file(r) is not None]
    rest = [r for r in files if r not in consolidated and r not in recs]
    return [consolidated, recs, rest]


# -- rm ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SetFiles:
    store: Store
    set_id: str
    files: dict[str, Entry]

    @property
    def url(self) -> str:
        return self.store.url_of(self.set_id)

    @property
    def bytes(self) -> int:
        return sum(e.size for e in self.files.values())


def find_set(store: Store, name: str) -> SetFiles:
    """The files of the set ``name`` in ``store``; refuses (``ActcacheError``) anything that is not one set."""
    url = store.url_of(name)
    if name.startswith("t") and store.url.rstrip("/").endswith(layout.TOKENS_ROOT):
        raise ActcacheError(
            f"{url} is a token cache, not a set; `actcache gc STORE` removes the token caches that no set uses"
        )
    if not inventory.is_set_id(name):
        if _looks_like_store(store.child(name)):
            raise ActcacheError(
                f"{url} is a store, not a set: rm removes one set, <store>/<set_id> (see `actcache ls {url}`)"
            )
        raise ActcacheError(f"{url} is not a set: a set URL ends in its 24-character id (see `actcache ls STORE`)")
    link = store.symlink_in(name)
    if link is not None:
        raise ActcacheError(
            f"{store.url_of(link)} is a symlink; rm deletes only files inside the store, never through a link: "
            "remove the link by hand if you mean to"
        )
    files = store.listing(name)
    if not files and not store.exists(name):  # an empty folder is what an rm killed at its end leaves
        raise ActcacheError(f"no activation set at {url} (nothing there)")
    if not files and store.is_file(name):
        raise ActcacheError(
            f"{url} is a file (an object of that name), not a set folder; it was not written by actcache: "
            "remove it by hand if you mean to"
        )
    strangers = sorted(r for r in files if not inventory.is_set_file(r))
    if strangers:
        raise ActcacheError(
            f"{url} holds files that are not part of a set ({strangers[0]!r}); "
            "it was not written by actcache: remove it by hand if you mean to"
        )
    _refuse_live_writers(store, name, files)
    return SetFiles(store, name, files)


def _refuse_live_writers(store: Store, set_id: str, files: dict[str, Entry] | None = None) -> None:
    """Refuse (``Failure``) a set that a live writer holds a lease on (``storage.leases``): removed under it, the
    writer would write half of it again."""
    writers = leases.live(store, set_id, files)
    if writers:
        w = writers[0]
        raise Failure(
            f"{store.url_of(set_id)} is being written by {w.writer()} (lease {store.url_of(w.rel)}); rm removes "
            "nothing while a writer runs: wait for it to end or stop it, then rerun rm (a lease of a process that no "
            f"longer runs, or another host's not renewed for {leases.STALE_S / 60:.0f} min, does not count)"
        )


def _looks_like_store(store: Store) -> bool:
    try:
        names = store.list_dirs()
    except ActcacheError:
        return False
    return layout.TOKENS_ROOT in names or any(inventory.is_set_id(n) for n in names)


def remove_set(target: SetFiles) -> None:
    """Delete the set's files: its content index entries, manifest, then records, then shards (see the module
    docstring), then its folder."""
    from actcache.format import content

    _refuse_live_writers(target.store, target.set_id)  # again: one may have started since ``find_set`` listed
    try:
        m = target.store.read_json(f"{target.set_id}/{layout.MANIFEST}")
    except (FileNotFoundError, ValueError):
        m = None  # no manifest (an rm resumed, a run under way): no entry is trusted without one anyway
    if isinstance(m, dict):  # first: an entry never names a set being removed (a kill here only unindexes it)
        for cid in filter(None, (content.stored_id(m), content.stored_family(m))):
            content.drop(target.store, cid, target.set_id)
    for step, rels in zip(("manifest", "records", "shards"), removal_order(target.files), strict=True):
        target.store.remove([f"{target.set_id}/{r}" for r in rels])
        crashpoints.point(f"rm.{step}-removed")
    # A writer (cp, shuffle, an extraction) that checked its shards before they went may have put its manifest in
    # since the listing: over the shards just deleted it would call the set complete.
    target.store.remove([f"{target.set_id}/{layout.MANIFEST}"])
    target.store.remove_folder(target.set_id)


# -- gc ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Garbage:
    kind: str
    """temp-file, upload (an S3 multipart upload never completed), token-cache, lease (a writer's that ended) or
    content-entry (an index entry naming a set no longer there)."""
    url: str
    bytes: int
    reason: str
    rel: str
    upload_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("rel")
        return d


@dataclass(frozen=True)
class GarbageReport:
    items: list[Garbage]
    notes: list[str]
    """Why something that looks collectable is kept."""

    @property
    def bytes(self) -> int:
        return sum(g.bytes for g in self.items)


def check_store(store: Store) -> None:
    """Refuse (``ActcacheError``) anything that is not a store: gc must never sweep a folder it does not own."""
    store.check_reachable()
    if not _looks_like_store(store):
        name = store.url.rstrip("/").rsplit("/", 1)[-1]
        if inventory.is_set_id(name):
            raise ActcacheError(f"{store.url} is a set, not a store; gc works on the store that holds it")
        raise ActcacheError(
            f"{store.url} is not an actcache store (no set folders, no {layout.TOKENS_ROOT}/); "
            "give the folder or s3:// prefix passed to `actcache extract --store`"
        )


def find_garbage(store: Store, older_than_s: float) -> GarbageReport:
    """Everything ``collect`` would delete in ``store``, and notes on what is kept and why."""
    check_store(store)
    now = time.time()
    items: list[Garbage] = []
    notes: list[str] = []
    sets = inventory.list_sets(store)
    writing = _Writers(store, [s.set_id for s in sets])
    for t in store.temp_files():
        if not layout.is_store_file(t.target):
            continue  # a user's file that only looks like a temp file, or one in a folder that is not actcache's
        old = now - t.mtime > older_than_s
        if not t.same_host and old and (w := writing.by_host(t.host)):
            notes.append(f"kept {store.url_of(t.rel)}: host {t.host} holds a live lease on {w} (see `actcache rm`)")
            continue
        if t.writer_dead or (not t.same_host and old):
            why = (
                f"writer pid {t.pid} no longer runs"
                if t.writer_dead
                else f"written by host {t.host}, untouched for {_age(now - t.mtime)}"
            )
            items.append(Garbage(TEMP_FILE, store.url_of(t.rel), t.size, why, t.rel))
    for u in store.incomplete_uploads():
        if not layout.is_store_file(u.rel):
            notes.append(f"kept the upload of {store.url_of(u.rel)}: not a file actcache writes")
        elif lease := writing.of(u.rel.split("/", 1)[0]):
            notes.append(f"kept the upload of {store.url_of(u.rel)}: its set is being written by {lease.writer()}")
        elif now - u.initiated > older_than_s:
            items.append(
                Garbage(
                    UPLOAD,
                    store.url_of(u.rel),
                    u.size,
                    f"multipart upload started {_age(now - u.initiated)} ago, never completed",
                    u.rel,
                    u.upload_id,
                )
            )
        else:
            notes.append(
                f"kept the upload of {store.url_of(u.rel)}: started {_age(now - u.initiated)} ago, "
                "maybe still running (see --older-than)"
            )
    ended = _ended_leases(store, sets, writing, older_than_s)
    items += ended
    items += _orphan_entries(store, {s.set_id for s in sets}, notes)
    # A set folder that held only the lease of a writer that ended (killed before it wrote anything) is no set
    # being written: it does not keep every token cache.
    emptied = {g.rel.split("/", 1)[0] for g in ended if g.reason.endswith(_ONLY)}
    unknown = [s for s in sets if s.state in (inventory.INCOMPLETE, inventory.DAMAGED) and s.set_id not in emptied]
    used = {s.tokens_id for s in sets}
    link = store.symlink_in(layout.TOKENS_ROOT, below=False)
    if link is not None:
        notes.append(f"kept every token cache: {store.url_of(link)} is a symlink, and gc deletes nothing through one")
        return GarbageReport(items, notes)
    for tid in inventory.token_cache_ids(store):
        if tid in used:
            continue
        why = _why_keep(store, layout.tokens_dir(tid), unknown, now, older_than_s)
        if why:
            notes.append(f"kept the token cache {tid}: {why}")
            continue
        rel = layout.tokens_dir(tid)
        size = sum(e.size for e in store.listing(rel).values())
        items.append(Garbage(TOKEN_CACHE, store.url_of(rel), size, "no set in this store uses it", rel))
    return GarbageReport(items, notes)


class _Writers:
    """The writer leases (``storage.leases``) on the store's sets, each set's folder of them listed once."""

    def __init__(self, store: Store, set_ids: list[str]):
        self.store, self.set_ids = store, set_ids
        self._seen: dict[str, list[leases.Lease]] = {}

    def all(self, set_id: str) -> list[leases.Lease]:
        """Every lease on ``set_id``, live or not (a set folder's name; anything else has none)."""
        if not layout.SET_ID_RE.match(set_id) or set_id.startswith("t"):
            return []
        if set_id not in self._seen:
            self._seen[set_id] = leases.leases(self.store, set_id)
        return self._seen[set_id]

    def of(self, set_id: str) -> leases.Lease | None:
        """A live lease on ``set_id``, if any."""
        return next((le for le in self.all(set_id) if le.live), None)

    def by_host(self, host: str) -> str | None:
        """The URL of a set that ``host`` holds a live lease on, if any: its temp files, in a set or in a token
        cache it tokenizes into, may still be written."""
        for set_id in self.set_ids:
            if any(le.live and le.host == host for le in self.all(set_id)):
                return self.store.url_of(set_id)
        return None


_ONLY = "; nothing else is in its set's folder"


def _ended_leases(
    store: Store, sets: list[inventory.SetEntry], writing: _Writers, older_than_s: float
) -> list[Garbage]:
    """The leases (``storage.leases``) of writers that ended without removing them (killed): this host's whose
    process no longer runs, another host's not renewed for ``STALE_S`` and ``older_than_s``."""
    out = []
    for s in sets:
        found = writing.all(s.set_id)
        ended = [le for le in found if not le.live and (le.same_host or le.age > older_than_s)]
        if not ended:
            continue
        only = False
        if len(ended) == len(found) and s.state == inventory.INCOMPLETE and not s.n_shards:
            only = all(layout.parse_writer_file(r) is not None for r in store.listing(s.set_id))
        for le in ended:
            why = (
                f"writer pid {le.pid} no longer runs"
                if le.same_host
                else f"host {le.host}'s writer lease, not renewed for {_age(le.age)}"
            )
            out.append(Garbage(LEASE, store.url_of(le.rel), 0, why + (_ONLY if only else ""), le.rel))
    return out


def _orphan_entries(store: Store, held: set[str], notes: list[str]) -> list[Garbage]:
    """Content index entries (``format.content``) that name a set this store no longer holds at all (one whose
    manifest could not be read when ``rm`` removed it, or removed by hand): lookups ignore them, nothing else
    removes them. An entry is written only after its set's manifest, so a set being written has its folder."""
    from actcache.format import content

    link = store.symlink_in(layout.CONTENT_ROOT, below=False)
    if link is not None:
        notes.append(f"kept every content entry: {store.url_of(link)} is a symlink, and gc deletes nothing through one")
        return []
    out = []
    for name, entry in sorted(store.listing(layout.CONTENT_ROOT).items()):
        rel = f"{layout.CONTENT_ROOT}/{name}"
        if not layout.is_store_file(rel):
            continue
        set_id = content.named_set(store, name.removesuffix(".json"))
        if set_id is not None and set_id not in held:
            why = f"names set {set_id}, which this store no longer holds"
            out.append(Garbage(CONTENT_ENTRY, store.url_of(rel), entry.size, why, rel))
    return out


def _why_keep(store: Store, rel: str, unknown: list[inventory.SetEntry], now: float, older_than_s: float) -> str:
    """Why the token cache ``rel``, which no manifest names, may still be in use or is not actcache's; "" if none."""
    if unknown:
        return (
            f"{len(unknown)} set(s) without a readable manifest (e.g. {unknown[0].set_id}, {unknown[0].state}) "
            "may be reading it; finish or remove them first"
        )
    link = store.symlink_in(rel)
    if link is not None:
        return f"{store.url_of(link)} is a symlink, and gc deletes nothing through one"
    files = store.listing(rel)
    strangers = sorted(r for r in files if not layout.is_token_file(r) and layout.parse_temp(r) is None)
    if strangers:
        return f"it holds {strangers[0]!r}, which actcache does not write; remove it by hand if you mean to"
    live = [t for t in store.temp_files(rel) if t.same_host and not t.writer_dead]
    if live:
        return f"process {live[0].pid} of this host is writing it"
    newest = max((e.mtime for e in files.values()), default=0.0)
    if now - newest <= older_than_s:
        return f"written {_age(now - newest)} ago: an extraction may be using it (see --older-than)"
    return ""


def collect(store: Store, report: GarbageReport) -> None:
    """Delete what ``find_garbage`` found (a token cache's index first, then its records, then its shards)."""
    store.remove([g.rel for g in report.items if g.kind in (TEMP_FILE, LEASE, CONTENT_ENTRY)])
    for set_id in dict.fromkeys(g.rel.split("/", 1)[0] for g in report.items if g.kind == LEASE):
        store.remove_folder(set_id)  # the folders left empty (a lease's, a folder that held only it): no file
    for g in report.items:
        if g.kind == UPLOAD:
            store.abort_upload(Upload(g.rel, g.upload_id or "", 0.0, g.bytes))
        elif g.kind == TOKEN_CACHE:
            files = {r: e for r, e in store.listing(g.rel).items() if layout.is_store_file(f"{g.rel}/{r}")}
            for rels in removal_order(files):
                store.remove([f"{g.rel}/{r}" for r in rels])
            store.remove_folder(g.rel)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"
