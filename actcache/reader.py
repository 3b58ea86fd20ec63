"""Reading a set back: its manifest, its shards as tensors, and a checksum verification."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from actcache import layout, manifest, records, shard
from actcache.errors import ActcacheError
from actcache.store import StoreRef


@dataclass(frozen=True)
class Shard:
    index: int
    activations: torch.Tensor
    """``[n_seq, context_size, d]`` in the set's storage dtype."""
    tokens: torch.Tensor
    """``[n_seq, context_size]`` int32 token ids."""


class ActivationSet:
    def __init__(self, url: str | StoreRef, storage_options: dict[str, Any] | None = None, *,
                 credentials_block: str | None = None):
        store_ref, self.set_id = StoreRef.of(url, storage_options, credentials_block).split()
        self.store = store_ref.open()
        self.url = self.store.url_of(self.set_id)
        self.manifest = manifest.read(self.store, self.set_id)
        self.records = [records.Record.from_dict(r) for r in self.manifest["shards"]]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def n_tokens(self) -> int:
        return sum(r.n_tokens for r in self.records)

    def read(self, record: records.Record, *, verify: bool = False) -> Shard:
        data = self.store.read_bytes(f"{self.set_id}/{record.file}")
        if verify and hashlib.sha256(data).hexdigest() != record.sha256:
            raise ActcacheError(f"shard {record.index} of {self.url} fails its checksum; run `actcache verify` "
                                "and rerun the extraction to repair it")
        m = self.manifest
        ctx = m["key"]["tokens"]["context_size"]
        expect = {"activations": (shard.TORCH_DTYPES[m["dtype"]], (record.n_seq, ctx, m["d"])),
                  "tokens": (torch.int32, (record.n_seq, ctx))}
        try:
            t = shard.decode(data, codec=m["codec"], expect=expect)
        except Exception as e:
            raise ActcacheError(f"shard {record.index} of {self.url} is unreadable ({e})") from None
        return Shard(record.index, t["activations"], t["tokens"])

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


def open_set(url: str | StoreRef, storage_options: dict[str, Any] | None = None, *,
             credentials_block: str | None = None) -> ActivationSet:
    """Open the activation set at ``url`` (``<store>/<set_id>``: a local path, s3://bucket/prefix/<set_id>, ...).

    ``url`` may be a ``StoreRef`` of the set (as ``Plan.refs`` gives), which carries its options and block;
    otherwise ``storage_options`` go to fsspec (e.g. ``{"endpoint_url": ...}``) and ``credentials_block``
    names a Prefect AwsCredentials block (default: the AWS chain: env, profile, instance role).
    """
    return ActivationSet(url, storage_options, credentials_block=credentials_block)
