"""Reading a set back: its manifest, its shards as tensors, and a checksum verification."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from actcache import layout, manifest, records, shard
from actcache.errors import ActcacheError
from actcache.store import Store


def split_set_url(url: str) -> tuple[str, str]:
    """``<store>/<set_id>`` -> (store URL, set id)."""
    url = url.rstrip("/")
    if "/" not in url:
        return ".", url
    store, set_id = url.rsplit("/", 1)
    return store or "/", set_id


LAYOUTS = ("sequences", "rows")
"""``sequences``: shards of whole sequences as extracted. ``rows``: shards of single token positions (e.g. a globally
shuffled copy), each with the flat index of its row in the source set."""


@dataclass(frozen=True)
class Shard:
    index: int
    activations: torch.Tensor
    """``[n_seq, context_size, d]`` (layout ``sequences``) or ``[n_rows, d]`` (``rows``), in the storage dtype."""
    tokens: torch.Tensor
    """``[n_seq, context_size]`` or ``[n_rows]`` int32 token ids."""
    positions: torch.Tensor | None = None
    """``rows`` layout: ``[n_rows]`` int64, each row's flat index (sequence * context_size + position) in the set
    it came from. None for ``sequences`` (there the position is the index itself)."""


class ActivationSet:
    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, *,
                 credentials_block: str | None = None):
        store_url, self.set_id = split_set_url(url)
        self.store = Store(store_url, storage_options, credentials_block=credentials_block)
        self.url = self.store.url_of(self.set_id)
        self.manifest = m = manifest.read(self.store, self.set_id)
        self.records = [records.Record.from_dict(r) for r in m["shards"]]
        self.layout: str = m.get("layout", "sequences")
        if self.layout not in LAYOUTS:
            raise ActcacheError(f"set {self.url} has layout {self.layout!r}, which this actcache cannot read "
                                f"(it reads {', '.join(LAYOUTS)}); upgrade actcache")
        self.d: int = m["d"]
        self.dtype: torch.dtype = shard.TORCH_DTYPES[m["dtype"]]
        self.tokenization: dict[str, Any] = m.get("tokenization") or {}
        ctx = self.tokenization.get("context_size") if self.layout == "rows" else m["key"]["tokens"]["context_size"]
        self.context_size: int | None = ctx
        """Tokens per sequence of the extraction (None for a rows set whose manifest does not say)."""

    def __len__(self) -> int:
        return len(self.records)

    @property
    def n_tokens(self) -> int:
        return sum(r.n_tokens for r in self.records)

    def expect(self, record: records.Record) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """The tensors (dtype, shape) a shard must hold."""
        if self.layout == "rows":
            n = record.n_tokens
            return {"activations": (self.dtype, (n, self.d)), "tokens": (torch.int32, (n,)),
                    "positions": (torch.int64, (n,))}
        ctx = self.context_size
        return {"activations": (self.dtype, (record.n_seq, ctx, self.d)), "tokens": (torch.int32, (record.n_seq, ctx))}

    def read(self, record: records.Record, *, verify: bool = False) -> Shard:
        """One shard. Its tensors are views of the bytes read, with no copy (of the file's pages, memory-mapped
        copy-on-write, on a local store)."""
        rel = f"{self.set_id}/{record.file}"
        try:
            data = self.store.read_mapped(rel)
        except FileNotFoundError:
            raise ActcacheError(f"shard {record.index} of {self.url} is missing ({record.file}); run `actcache "
                                "verify` and rerun the extraction to repair it") from None
        if verify and hashlib.sha256(data).hexdigest() != record.sha256:
            raise ActcacheError(f"shard {record.index} of {self.url} fails its checksum; run `actcache verify` "
                                "and rerun the extraction to repair it")
        try:
            t = shard.decode(data, codec=self.manifest["codec"], expect=self.expect(record))
        except Exception as e:
            raise ActcacheError(f"shard {record.index} of {self.url} is unreadable ({e})") from None
        return Shard(record.index, t["activations"], t["tokens"], t.get("positions"))

    def read_tokens(self, record: records.Record) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A shard's token ids, flat, and its positions (rows layout; else None). Uncompressed shards are read
        only where these tensors lie (a few bytes per row); compressed ones whole."""
        names = ("tokens", "positions") if self.layout == "rows" else ("tokens",)
        if self.manifest["codec"] != "none":
            s = self.read(record)
            return s.tokens.reshape(-1), s.positions
        rel = f"{self.set_id}/{record.file}"
        expect = self.expect(record)
        try:
            head = self.store.read_range(rel, 0, min(record.bytes, 1 << 16))
            if len(head) >= 8 and 8 + int.from_bytes(head[:8], "little") > len(head):  # a header above 64 KB
                head = self.store.read_range(rel, 0, min(record.bytes, 8 + int.from_bytes(head[:8], "little")))
            start, entries = shard.header(head, size=record.bytes)
            out = {}
            for name in names:
                if name not in entries:
                    raise ValueError(f"shard has no tensor {name!r} (has {sorted(entries)})")
                dtype, shape, begin, end = entries[name]
                out[name] = shard.tensor(self.store.read_range(rel, start + begin, start + end), dtype, shape)
            shard.check(out, {k: expect[k] for k in names})
        except FileNotFoundError:
            raise ActcacheError(f"shard {record.index} of {self.url} is missing ({record.file}); run `actcache "
                                "verify` and rerun the extraction to repair it") from None
        except ValueError as e:
            raise ActcacheError(f"shard {record.index} of {self.url} is unreadable ({e})") from None
        return out["tokens"].reshape(-1), out.get("positions")

    def __iter__(self) -> Iterator[Shard]:
        for r in self.records:
            yield self.read(r)

    def verify(self) -> list[str]:
        """Every problem found (missing, wrong size, bad checksum, unrecorded record); empty when sound."""
        problems = []
        listing = self.store.listing(self.set_id)
        in_manifest = {r.index for r in self.records}
        for r in self.records:
            entry = listing.get(r.file)
            if entry is None:
                problems.append(f"shard {r.index}: {r.file} is missing")
                continue
            if entry.size != r.bytes:
                problems.append(f"shard {r.index}: {r.file} has {entry.size} bytes, expected {r.bytes} (truncated?)")
                continue
            digest = hashlib.sha256(self.store.read_bytes(f"{self.set_id}/{r.file}")).hexdigest()
            if digest != r.sha256:
                problems.append(f"shard {r.index}: {r.file} fails its sha256 checksum (corrupted)")
            if layout.record_file(r.index) not in listing:
                problems.append(f"shard {r.index}: completion record {layout.record_file(r.index)} is missing")
        for rel in listing:
            i = layout.parse_record_file(rel)
            if i is not None and i not in in_manifest:
                problems.append(f"shard {i}: completed but not in manifest.json (rerun extract to consolidate)")
        return problems


def open_set(url: str, storage_options: dict[str, Any] | None = None, *,
             credentials_block: str | None = None) -> ActivationSet:
    """Open the activation set at ``url`` (``<store>/<set_id>``: a local path, s3://bucket/prefix/<set_id>, ...).

    ``storage_options`` go to fsspec (e.g. ``{"endpoint_url": ...}``); ``credentials_block`` names a Prefect
    AwsCredentials block (otherwise the AWS chain: env, profile, instance role).
    """
    return ActivationSet(url, storage_options, credentials_block=credentials_block)
