"""Completion records: a shard counts as done only when its record exists and its bytes still match.

A folder of shards (an activation set or a token cache) is scanned with one listing plus one read of
its consolidated file; only records newer than that file are read one by one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from actcache import layout
from actcache.store import Entry, Store


@dataclass(frozen=True)
class Record:
    index: int
    file: str
    n_seq: int
    n_tokens: int
    sha256: str
    bytes: int
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Record:
        rec = cls(**{k: d[k] for k in ("index", "file", "n_seq", "n_tokens", "sha256", "bytes")},
                  extra=dict(d.get("extra") or {}))
        # Records come from the store (or a hand-edited manifest): check types before they size tensors or paths.
        for name in ("index", "n_seq", "n_tokens", "bytes"):
            v = getattr(rec, name)
            if type(v) is not int or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if not isinstance(rec.sha256, str) or not isinstance(rec.file, str):
            raise ValueError("sha256 and file must be strings")
        layout.check_relative(rec.file)
        return rec


@dataclass
class Scan:
    """What one listing of a shard folder says is there."""

    store: Store
    root: str
    entries: dict[str, Entry]
    records: dict[int, Record]
    consolidated: dict[str, Any] | None

    def is_done(self, index: int, n_seq: int, *, verify: bool = False) -> bool:
        rec = self.records.get(index)
        if rec is None or rec.n_seq != n_seq:
            return False
        shard = self.entries.get(rec.file)
        if shard is None or shard.size != rec.bytes:
            return False
        written = self.entries[layout.record_file(index)]
        # A shard touched after its record was written may have been corrupted in place: re-hash it.
        if verify or shard.mtime > written.mtime:
            return hashlib.sha256(self.store.read_bytes(f"{self.root}/{rec.file}")).hexdigest() == rec.sha256
        return True

    def sorted_records(self) -> list[Record]:
        return [self.records[i] for i in sorted(self.records)]


def scan(store: Store, root: str, consolidated_name: str) -> Scan:
    entries = store.listing(root)
    consolidated = None
    known: dict[int, Record] = {}
    c_entry = entries.get(consolidated_name)
    if c_entry is not None:
        try:
            consolidated = store.read_json(f"{root}/{consolidated_name}")
            known = {r["index"]: Record.from_dict(r) for r in consolidated.get("shards", [])}
        except (ValueError, KeyError, TypeError):
            consolidated, known = None, {}  # unreadable: fall back to the records themselves
    records = {}
    for rel, entry in entries.items():
        index = layout.parse_record_file(rel)
        if index is None:
            continue
        if index in known and c_entry is not None and entry.mtime <= c_entry.mtime:
            records[index] = known[index]
            continue
        try:
            records[index] = Record.from_dict(store.read_json(f"{root}/{rel}"))
        except (ValueError, KeyError, TypeError, FileNotFoundError):
            continue  # a damaged record means not done: the shard is recomputed
    return Scan(store, root, entries, records, consolidated)


def digest(recs: Iterable[Record]) -> str:
    """sha256 over each record's index and shard checksum, in order: names a list of shards exactly."""
    return hashlib.sha256("".join(f"{r.index}:{r.sha256}," for r in recs).encode()).hexdigest()


def write_record(store: Store, root: str, record: Record) -> None:
    store.write_json(f"{root}/{layout.record_file(record.index)}", record.to_dict())
