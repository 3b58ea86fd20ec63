"""The small references the stages pass to each other (never tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ActivationsRef:
    """One shard's filled ``ShardFile`` (activations + tokens), held in the process-local hand-off."""

    handle: str
    hook: str
    index: int
    n_seq: int


@dataclass(frozen=True)
class PackedRef:
    """The shard's stored bytes (a ``shardfile.Payload``) in the hand-off, with what the completion record needs."""

    handle: str
    hook: str
    index: int
    n_seq: int
    sha256: str
    bytes: int
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
