"""Completion records: a shard counts as done only when its record exists and its bytes still match.

A folder of shards (an activation set or a token cache) is scanned with one listing plus one read of
its consolidated file; only records newer than that file are read one by one.

Nothing here trusts an editable field alone. Records, manifests and token indexes carry a seal (the sha256
of their own JSON): a file changed after actcache wrote it counts as damaged (a record: its shard is redone;
a consolidated file: it is rebuilt from the records). What sizes a shard is checked against the folder's key
(``Bounds``). A shard is re-hashed before it is trusted whenever its witnesses disagree: touched after its
record, or a record that differs from the consolidated file's entry. Bit rot that changes no size, mtime or
record is only seen by hashing: ``--verify-existing`` and ``actcache verify``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from actcache.format import layout
from actcache.storage.store import DamagedFile, Entry, Store

SEAL = "json_sha256"
"""Field holding the sha256 of the rest of a JSON file actcache wrote (records, manifests, token indexes)."""
RECORD_LIMIT = 64 << 20
"""Largest completion record read where the key vouches for no width (``record_cap``)."""
RECORD_BASE = 1 << 20
RECORD_PER_VALUE = 512
"""A record carries its shard's moments: float64 vectors in base64 (~11 bytes per value each), two for the totals
and two for each of up to ten token groups (``moments``): ~240 bytes per value of the width, the rest a few KB."""


def record_cap(width: int | None) -> int:
    """Largest completion record read for a set whose key vouches for ``width`` values per token (None: unknown)."""
    return RECORD_LIMIT if width is None else min(RECORD_LIMIT, RECORD_BASE + RECORD_PER_VALUE * width)


_SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")


def _json_digest(obj: dict[str, Any]) -> str:
    body = {k: v for k, v in obj.items() if k != SEAL}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sealed(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with its seal, as written to the store."""
    return {**obj, SEAL: _json_digest(obj)}


def check_sealed(obj: Any, what: str) -> dict[str, Any]:
    """``obj`` if it is a JSON object whose seal (when it has one: older files have none) matches."""
    if not isinstance(obj, dict):
        raise ValueError(f"{what} is a JSON {type(obj).__name__}, not an object")
    if SEAL in obj and obj[SEAL] != _json_digest(obj):
        raise ValueError(f"{what} was changed after actcache wrote it (its {SEAL} does not match)")
    return obj


@dataclass(frozen=True)
class Bounds:
    """What a folder's key fixes about each of its shards; records are checked against it before use."""

    codec: str
    seqs_per_shard: int
    context_size: int
    dtype: str | None = None
    """Storage dtype of ``activations`` (None: a token cache, whose shards hold ``tokens`` only)."""
    d: int | None = None
    """Width of ``activations`` when known: then a re-hashed shard's header is checked too."""
    rows: bool = False
    """A shuffled ("rows") set: one row per "sequence" of one token; no header check here (``ActivationSet.read``)."""
    examples: bool = False
    """A set of one example per sequence (packing none): ``context_size`` is the rows stored per example, and the
    shard holds more tensors than tokens and activations (``extraction.examples``): no header check here."""
    owner: str | None = None
    """Id of the folder's set (or token cache): a record or shard naming another is damage, never adopted."""
    hook: str | None = None
    """The set's hook, which its shards' metadata names."""
    record_limit: int = RECORD_LIMIT
    """Largest completion record read (``record_cap`` of the key's width, where it vouches for one)."""

    @classmethod
    def of(cls, key: Any, d: int | None = None, record_limit: int | None = None) -> Bounds:
        """For a SetKey (its codec and dtype), a TokensKey (token shards are never compressed) or a ShuffleKey
        (uncompressed shards of at most ``rows_per_shard`` rows). ``record_limit``: else derived from ``d`` (capped
        at ``RECORD_LIMIT``: a manifest's d is no key's word)."""
        limit = record_limit if record_limit is not None else record_cap(d)
        if record_limit is None and not hasattr(key, "tokens") and not hasattr(key, "rows_per_shard"):
            limit = RECORD_BASE  # a token cache's: its records hold no moments (a few hundred bytes)
        if getattr(key, "kind", None) == "shuffle":
            return cls("none", key.rows_per_shard, 1, None, d, rows=True, owner=key.id, record_limit=limit)
        tokens = getattr(key, "tokens", key)
        if getattr(tokens, "packing", "concat") == "none" and hasattr(key, "positions"):
            from actcache.extraction.positions import parse

            pos = parse(key.positions, tokens.context_size)
            rows = 0 if pos.kind == "all" else pos.n_rows(tokens.context_size)  # 0: each example's own length
            return cls(
                key.codec,
                tokens.seqs_per_shard,
                rows,
                key.dtype,
                d,
                examples=True,
                owner=key.id,
                hook=key.hook,
                record_limit=limit,
            )
        codec, dtype = getattr(key, "codec", "none"), getattr(key, "dtype", None)
        return cls(
            codec,
            tokens.seqs_per_shard,
            tokens.context_size,
            dtype,
            d,
            owner=key.id,
            hook=getattr(key, "hook", None),
            record_limit=limit,
        )

    def provenance(self, rec: Record) -> dict[str, str]:
        """What the metadata of ``rec``'s shard must name, where it names it (``header.check_provenance``)."""
        out = {"index": str(rec.index)}
        if self.owner is not None:
            out["set_id"] = self.owner
        if self.hook is not None:
            out["hook"] = self.hook
        return out

    def expect(self, rec: Record) -> dict[str, tuple[str, tuple[int, ...]]] | None:
        """Each tensor's dtype (by name: no torch needed) and shape in ``rec``'s shard (None when the width of
        activations is unknown)."""
        if self.rows or self.examples:
            return None
        out: dict[str, tuple[str, tuple[int, ...]]] = {"tokens": ("int32", (rec.n_seq, self.context_size))}
        if self.dtype is None:
            return out
        if self.d is None:
            return None
        return {**out, "activations": (self.dtype, (rec.n_seq, self.context_size, self.d))}


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
    def from_dict(cls, d: dict[str, Any], bounds: Bounds | None = None) -> Record:
        """A record from the store (or a hand-edited manifest), checked before it sizes tensors or names paths."""
        if not isinstance(d, dict):
            raise ValueError(f"a shard entry must be a JSON object, got {type(d).__name__}")
        extra = d.get("extra") or {}
        if not isinstance(extra, dict):
            raise ValueError("extra must be an object")
        rec = cls(**{k: d[k] for k in ("index", "file", "n_seq", "n_tokens", "sha256", "bytes")}, extra=dict(extra))
        for name in ("index", "n_seq", "n_tokens", "bytes"):
            v = getattr(rec, name)
            if type(v) is not int or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if not isinstance(rec.sha256, str) or not _SHA256_RE.match(rec.sha256) or not isinstance(rec.file, str):
            raise ValueError("sha256 must be 64 hex digits and file a string")
        layout.check_relative(rec.file)
        if layout.parse_shard_file(rec.file) != rec.index:
            raise ValueError(f"shard {rec.index} names the file {rec.file!r}")
        if bounds is not None:
            owner = rec.extra.get("set_id")
            if bounds.owner is not None and owner is not None and owner != bounds.owner:
                raise ValueError(f"shard {rec.index}'s record belongs to set {owner!r} (copied from another set?)")
            if rec.file != layout.shard_file(rec.index, bounds.codec):
                raise ValueError(f"shard {rec.index} names the file {rec.file!r}, not one of codec {bounds.codec}")
            rows = rec.n_tokens if bounds.examples and bounds.context_size == 0 else rec.n_seq * bounds.context_size
            if not 1 <= rec.n_seq <= bounds.seqs_per_shard or rec.n_tokens != rows:
                raise ValueError(
                    f"shard {rec.index} claims {rec.n_seq} sequences / {rec.n_tokens} tokens; the key "
                    f"allows 1..{bounds.seqs_per_shard} sequences of {bounds.context_size} tokens"
                )
        return rec


def records_of(entries: Any, bounds: Bounds | None = None) -> dict[int, Record]:
    """{index: Record} from a consolidated file's ``shards`` list; a shard listed twice is an error."""
    if not isinstance(entries, list):
        raise ValueError("shards must be a list")
    out: dict[int, Record] = {}
    for d in entries:
        rec = Record.from_dict(d, bounds)
        if rec.index in out:
            raise ValueError(f"shard {rec.index} is listed twice")
        out[rec.index] = rec
    return out


def hash_matches(store: Store, root: str, rec: Record, bounds: Bounds | None = None) -> bool:
    """Whether the stored bytes of ``rec``'s shard have its size and sha256 (reading at most that size) and, with
    ``bounds``, a safetensors header that agrees with them and names this set, hook and index (a record can vouch
    for a malformed shard, or for one copied in from another set)."""
    from actcache.format.header import check_header

    try:
        data = store.read_bytes(f"{root}/{rec.file}", size=rec.bytes)
    except (FileNotFoundError, DamagedFile):
        return False
    if hashlib.sha256(data).hexdigest() != rec.sha256:
        return False
    if bounds is not None:
        try:
            check_header(data, codec=bounds.codec, expect=bounds.expect(rec), provenance=bounds.provenance(rec))
        except ValueError:
            return False
    return True


@dataclass
class Scan:
    """What one listing of a shard folder says is there."""

    store: Store
    root: str
    entries: dict[str, Entry]
    records: dict[int, Record]
    consolidated: dict[str, Any] | None
    doubtful: set[int] = field(default_factory=set)
    """Indices whose record disagrees with the consolidated file's entry: re-hashed before they count."""
    bounds: Bounds | None = None

    def is_done(self, index: int, n_seq: int, *, verify: bool = False) -> bool:
        """Whether shard ``index`` holds at least ``n_seq`` sequences, recorded and (when in doubt) re-hashed.

        At least, not exactly: a shard of a larger target starts with the smaller target's sequences, so a run
        with a lower --max-tokens uses it as is instead of shrinking it.
        """
        rec = self.records.get(index)
        if rec is None or rec.n_seq < n_seq:
            return False
        shard = self.entries.get(rec.file)
        written = self.entries.get(layout.record_file(index))
        if shard is None or written is None or shard.size != rec.bytes:
            return False
        # A shard touched after its record was written may have been corrupted in place: re-hash it.
        if verify or shard.mtime > written.mtime or index in self.doubtful:
            return hash_matches(self.store, self.root, rec, self.bounds)
        return True

    def done_of(self, shards: Sequence[Any], *, verify: bool | Callable[[int], bool] = False) -> list[Any]:
        """The shards of ``shards`` (``ShardWork``s, shard i at position i) that are done. Only recorded indices are
        looked at: before the dataset's end is known a plan may name millions of shards. ``verify``: re-hash all,
        or those for which it returns True."""
        return [
            shards[i]
            for i in sorted(self.records)
            if i < len(shards) and self.is_done(i, shards[i].n_seq, verify=verify(i) if callable(verify) else verify)
        ]

    def sorted_records(self) -> list[Record]:
        return [self.records[i] for i in sorted(self.records)]


def scan(
    store: Store,
    root: str,
    consolidated_name: str,
    bounds: Bounds | None = None,
    owner: str | None = None,
    *,
    read_all: bool = False,
) -> Scan:
    """One listing of ``root``; its consolidated file (unless damaged, or another folder's: ``owner`` is the
    id it must name) stands in for the records it lists that are older than itself, unless ``read_all``
    (--verify-existing): then every record is read, and one that disagrees with it is doubtful."""
    entries = store.listing(root)
    consolidated = None
    known: dict[int, Record] = {}
    c_entry = entries.get(consolidated_name)
    if c_entry is not None:
        try:
            consolidated = check_sealed(store.read_json(f"{root}/{consolidated_name}"), consolidated_name)
            if owner is not None and owner not in (consolidated.get("set_id"), consolidated.get("key")):
                raise ValueError(f"{consolidated_name} belongs to another folder")
            known = records_of(consolidated.get("shards", []), bounds)
        except (ValueError, KeyError, TypeError, FileNotFoundError):
            consolidated, known = None, {}  # damaged: every record is read, and the file is rebuilt from them
    records: dict[int, Record] = {}
    doubtful: set[int] = set()
    for rel, entry in entries.items():
        index = layout.parse_record_file(rel)
        if index is None:
            continue
        if index in known and c_entry is not None and entry.mtime <= c_entry.mtime and not read_all:
            records[index] = known[index]
            continue
        try:
            limit = bounds.record_limit if bounds is not None else RECORD_LIMIT
            rec = Record.from_dict(check_sealed(store.read_json(f"{root}/{rel}", limit=limit), rel), bounds)
        except (ValueError, KeyError, TypeError, FileNotFoundError):
            continue  # a damaged record means not done: the shard is recomputed
        if rec.index != index:
            continue  # a record copied under another shard's name
        records[index] = rec
        if index in known and known[index] != rec:
            doubtful.add(index)
    return Scan(store, root, entries, records, consolidated, doubtful, bounds)


def scan_set(store: Store, key: Any, *, read_all: bool = False, record_limit: int | None = None) -> Scan:
    """``scan`` of the activation set of ``key`` (a SetKey)."""
    bounds = Bounds.of(key, record_limit=record_limit)
    return scan(store, key.id, layout.MANIFEST, bounds, owner=key.id, read_all=read_all)


def digest(recs: Iterable[Record]) -> str:
    """sha256 over each record's index and shard checksum, in order: names a list of shards exactly."""
    return hashlib.sha256("".join(f"{r.index}:{r.sha256}," for r in recs).encode()).hexdigest()


def write_record(store: Store, root: str, record: Record) -> None:
    store.write_json(f"{root}/{layout.record_file(record.index)}", sealed(record.to_dict()))
