"""Reading a set back: its manifest, its shards as tensors, and a checksum verification."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from actcache import environment, layout, manifest, records, shard
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

    def environments(self) -> dict[str, str]:
        """Where the environments that wrote this set's shards disagree: {field: one line} (see ``environment``)."""
        return environment.differences({r.index: r.extra.get("env") for r in self.records})

    @property
    def n_target_shards(self) -> int:
        """How many shards the extraction that wrote this set asked for (its ``target_tokens``)."""
        tokens = self.manifest["key"]["tokens"]
        target_seqs = int(self.manifest.get("target_tokens") or 0) // tokens["context_size"]
        return math.ceil(target_seqs / tokens["seqs_per_shard"])

    def missing(self) -> list[int]:
        """Indices of the shards the set's target asks for that it does not have (an unfinished extraction)."""
        have = {r.index for r in self.records}
        return [i for i in range(self.n_target_shards) if i not in have]

    def verify(self) -> list[str]:
        """Every problem found (shards missing from the target, missing files, wrong size, bad checksum,
        unrecorded record, an engine other than the key's); empty when sound."""
        problems = []
        gone = self.missing()
        if gone:
            shown = ", ".join(map(str, gone[:10])) + (", ..." if len(gone) > 10 else "")
            problems.append(f"incomplete: {len(gone)} of {self.n_target_shards} shards missing "
                            f"(indices {shown}); rerun the same extract to finish the set")
        engine = self.manifest["key"].get("forward", "bridge")
        wrong = [r.index for r in self.records if (r.extra.get("env") or {}).get("engine", engine) != engine]
        if wrong:
            problems.append(f"shards {wrong[:10]} were computed by another engine than the set key's {engine!r}; "
                            "delete them and rerun the extract")
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
