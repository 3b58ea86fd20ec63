"""Writer leases: every process that writes a set (an extraction or fan-out, ``cp``, ``shuffle``, ``stats``) holds one,
so that ``rm`` sees it and refuses, and the writer sees an ``rm`` that did not.

A lease is a small file in the set's folder, ``writers/<host>-<pid>.<start>-<8 hex>.json`` (``layout.writer_file``),
written before the writer's first look at the set and deleted when it ends. A thread renews it (its modification
time) every ``RENEW_S``. A lease is live while its writer may still write: of this process, while it holds it (one
whose deletion failed, the store unreachable as its run ended, is over: the next run in the same process sweeps
it); of another process on this host, while the process that started then still runs under its pid (as temp
files are judged); of another host, while it was renewed within ``STALE_S`` (its pid cannot be checked).

The writer checks, before each shard and before its manifest, that its lease is still there. A lease gone means
the set was removed under it (the folder deleted by hand, or by an ``rm`` that took a hung writer's lease for
stale): the writer stops in one line without writing anything more. An ``rm`` that listed the set just before a
writer took its lease (a window of one listing) cannot be seen this way; ``commit`` still writes no manifest for a
set whose shards are gone.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from actcache.errors import ActcacheError, Failure
from actcache.format import layout
from actcache.storage.housekeeping import _HOST, _alive, me
from actcache.storage.store import Store

P = ParamSpec("P")
R = TypeVar("R")

RENEW_S = 30.0
"""Seconds between renewals of a held lease."""
STALE_S = 600.0
"""Seconds after its last renewal that another host's lease stops counting (generous: clocks of hosts differ)."""


@dataclass(frozen=True)
class Lease:
    """A lease found in a set's folder."""

    rel: str
    """Relative to the store's root."""
    host: str
    pid: int
    age: float
    """Seconds since it was last renewed."""
    same_host: bool
    live: bool

    def writer(self) -> str:
        if self.same_host:
            return f"process {self.pid} of this host"
        return f"host {self.host} (pid {self.pid}, lease renewed {self.age:.0f} s ago)"


def leases(store: Store, set_id: str, files: dict | None = None) -> list[Lease]:
    """Every lease in the set's folder (``files``: its listing, if at hand), live or not."""
    now = time.time()
    if files is None:
        files = store.listing(f"{set_id}/{layout.WRITERS}")
        files = {f"{layout.WRITERS}/{r}": e for r, e in files.items()}
    out = []
    for rel, entry in sorted(files.items()):
        parsed = layout.parse_writer_file(rel)
        if parsed is None:
            continue
        host, pid, start = parsed
        age = max(0.0, now - entry.mtime)
        mine = host == _HOST
        if mine and pid == os.getpid():  # no other live process has this pid: the lease is ours, held or over
            live = rel.rsplit("/", 1)[-1] in _MINE
        else:
            live = _alive(pid, start) if mine else age <= STALE_S
        out.append(Lease(f"{set_id}/{rel}", host, pid, age, mine, live))
    return out


def live(store: Store, set_id: str, files: dict | None = None) -> list[Lease]:
    return [le for le in leases(store, set_id, files) if le.live]


class Held:
    """A lease this process holds on one set, renewed by a thread until released."""

    def __init__(self, store: Store, set_id: str):
        self.store, self.set_id = store, set_id
        pid, start = me()
        self.rel = f"{set_id}/{layout.writer_file(_HOST, pid, uuid.uuid4().hex[:8], start)}"
        self.lost: bool | None = False
        """True once the lease is found gone; None where it could not be written."""
        self._made: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="actcache-lease", daemon=True)

    def start(self) -> None:
        pid, start = me()
        data = json.dumps({"host": _HOST, "pid": pid, "start": start, "since": time.time()}).encode()
        if self.store.local:  # the folders this lease makes (the store's root too, if new), innermost first
            self._made = [
                rel
                for rel in (f"{self.set_id}/{layout.WRITERS}", self.set_id, "")
                if not os.path.isdir(self.store.path(rel))
            ]
        with _LOCK:  # held before it exists: a sweep by another thread of this process must not take it for over
            _MINE.add(self.name)
        for _ in range(2):  # twice: another writer of the set may remove the empty folder just as this one makes it
            try:
                self.store.write_bytes(self.rel, data)
            except ActcacheError:
                continue
            self._thread.start()
            return
        # Not writable (a read-only store serving a complete set needs no write): no lease, and nothing to check.
        # A writer that does write here fails on its own first write, saying why.
        self.lost = None
        with _LOCK:
            _MINE.discard(self.name)

    @property
    def name(self) -> str:
        return self.rel.rsplit("/", 1)[-1]

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                if self.store.local:
                    os.utime(self.store.path(self.rel))  # never recreates a lease that is gone
                elif self._present():
                    self.store.write_bytes(self.rel, self.store.read_bytes(self.rel, limit=4096))
                else:
                    raise FileNotFoundError(self.rel)
            except FileNotFoundError:
                self.lost = True
                return
            except Exception:
                continue  # storage unreachable for a moment: the next renewal tries again

    def _present(self) -> bool:
        self.store.fs.invalidate_cache(self.store.path(self.rel))  # s3fs may answer from a listing made before
        return self.store.exists(self.rel)

    def check(self) -> None:
        """Raise ``Failure`` if the lease is gone: the set was removed while this process wrote it."""
        if self.lost is None:
            return
        if self.lost or not self._present():
            self.lost = True
            raise Failure(
                f"{self.store.url_of(self.set_id)} was removed while this command wrote it (its writer lease "
                f"{self.store.url_of(self.rel)} is gone: `actcache rm`?); stopped without writing its manifest: "
                "rerun the same command to write the set again"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.lost is False:
            try:
                self.store.remove([self.rel])
            except Exception:
                pass  # a lease left behind is over (see above): swept by the set's next writer, or rm with the set
        with _LOCK:
            _MINE.discard(self.name)
        if self.store.local:  # the folders it made, where nothing else came in (a set found complete, never written)
            for rel in self._made:
                try:
                    os.rmdir(self.store.path(rel))
                except OSError:
                    break  # not empty: another writer's lease, or the set's files


_HELD: dict[tuple[str, str], list[Held]] = {}
_MINE: set[str] = set()
"""File names of the leases this process holds (a forked child inherits them under its parent's pid)."""
_LOCK = threading.Lock()
_SCOPE = threading.local()


def sweep(store: Store, set_id: str) -> None:
    """Delete the leases that killed writers of this host left in the set's folder."""
    store.remove([le.rel for le in leases(store, set_id) if le.same_host and not le.live])


def _take(store: Store, set_ids: str | list[str]) -> list[Held]:
    held: list[Held] = []
    try:
        for set_id in [set_ids] if isinstance(set_ids, str) else list(dict.fromkeys(set_ids)):
            sweep(store, set_id)
            h = Held(store, set_id)
            h.start()
            held.append(h)
            with _LOCK:
                _HELD.setdefault((store.url, set_id), []).append(h)
    except BaseException:
        _give_back(held)
        raise
    return held


def _give_back(held: list[Held]) -> None:
    for h in reversed(held):
        with _LOCK:
            mine = _HELD.get((h.store.url, h.set_id), [])
            if h in mine:
                mine.remove(h)
            if not mine:
                _HELD.pop((h.store.url, h.set_id), None)
        h.release()


@contextmanager
def hold(store: Store, set_ids: str | list[str]) -> Iterator[None]:
    """Hold a lease on each of ``set_ids`` in ``store`` for the block's duration (leases of dead writers of this host
    found there are swept first)."""
    held = _take(store, set_ids)
    try:
        yield
    finally:
        _give_back(held)


def releasing(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator of a function that writes sets: the leases it takes with ``acquire`` are released when it returns
    or raises (a lease taken where the function has computed the set ids, with no block around the rest)."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        outer = getattr(_SCOPE, "held", None)
        mine: list[Held] = []
        _SCOPE.held = mine
        try:
            return fn(*args, **kwargs)
        finally:
            _SCOPE.held = outer
            _give_back(mine)

    # Resolved here, in ``fn``'s module: what reads the wrapper's signature (Prefect's parameter model of a flow)
    # would look its annotations' names up in this module.
    run.__signature__ = inspect.signature(fn, eval_str=True)  # type: ignore[attr-defined]
    return run


def acquire(store: Store, set_ids: str | list[str]) -> None:
    """Hold a lease on each of ``set_ids`` in ``store`` until the function (decorated with ``releasing``) that calls
    this returns; before the writer's first look at the sets, so that ``rm`` sees it from then on."""
    scope = getattr(_SCOPE, "held", None)
    if scope is None:
        raise RuntimeError("leases.acquire outside a function decorated with leases.releasing")
    scope.extend(_take(store, set_ids))


def check(store: Store, set_id: str) -> None:
    """Raise ``Failure`` if this process holds a lease on the set and it is gone (a no-op where it holds none)."""
    with _LOCK:
        mine = list(_HELD.get((store.url, set_id), []))
    for h in mine:
        h.check()
