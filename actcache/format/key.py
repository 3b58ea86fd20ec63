"""The frozen keys whose fields are exactly what changes the bytes of a stored set.

A key's digest names its folder in the store (see ``layout.py``); anything that does not change the
bytes (``max_tokens``, batch size, device, store URL) stays out, so raising ``max_tokens`` extends a
set instead of starting a new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

# Bump when the shard or manifest layout changes: old sets stay readable under their old ids.
FORMAT_VERSION = 1

DTYPES = ("float32", "float16", "bfloat16")
CODECS = ("none", "zstd", "shuffle-zstd")


def _digest(obj: object, n: int = 24) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


class _Key:
    """A frozen dataclass whose id is the digest of all its fields (the prefix keeps kinds of ids apart)."""

    _prefix = ""

    @property
    def id(self) -> str:
        return self._prefix + _digest(self.to_dict())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)  # type: ignore[call-overload]  # every subclass is a dataclass


@dataclass(frozen=True)
class TokensKey(_Key):
    """What fixes the token ids of every sequence in every shard."""

    dataset: str
    """Dataset fingerprint: HF name/config/split/revision, or content hashes of the files."""
    tokenizer: str
    """Tokenizer fingerprint: hash of its serialized vocabulary, merges and special tokens."""
    text_column: str
    context_size: int
    prepend_bos: bool
    separator: int | None
    """Token id placed between packed documents (None: documents are concatenated as is)."""
    seqs_per_shard: int
    format_version: int = FORMAT_VERSION
    _prefix = "t"

    @property
    def shard_tokens(self) -> int:
        return self.seqs_per_shard * self.context_size


@dataclass(frozen=True)
class SetKey(_Key):
    """What fixes the bytes of an activation set: tokens, model, hook and storage encoding."""

    tokens: TokensKey
    model: str
    """Model fingerprint: hub commit sha, or content hash of a local directory's weights."""
    model_dtype: str
    """dtype the forward pass computes in (changes the numbers, not just their storage)."""
    hook: str
    dtype: str
    """Storage dtype of the activations."""
    codec: str
    codec_level: int
    forward: str = "bridge"
    """Engine that ran the forward pass (see ``extraction.forward_engine``): ``hf-sdpa`` and ``bridge`` agree
    to fp32 rounding, not bit for bit. Sets written before this field existed came from the bridge."""
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: dict) -> SetKey:
        return cls(**{**d, "tokens": TokensKey(**d["tokens"])})


@dataclass(frozen=True)
class ShuffleKey(_Key):
    """What fixes the bytes of a globally shuffled copy of a set (the "rows" layout, see ``shuffle.py``)."""

    source: str
    """Set id of the source set."""
    source_shards: str
    """Digest of the source's shard list (index and sha256 of each): a source extended later is another input."""
    seed: int
    rows_per_shard: int
    exclude: tuple[int, ...]
    """Token ids whose rows are left out, sorted."""
    kind: str = "shuffle"
    """Keeps these digests apart from every ``SetKey``'s."""
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: dict) -> ShuffleKey:
        if d.get("kind") != "shuffle":
            raise ValueError(f"not a shuffle key (kind {d.get('kind')!r})")
        return cls(**{**d, "exclude": tuple(d["exclude"])})


def key_from_dict(d: dict) -> SetKey | ShuffleKey:
    """The key a manifest holds: a shuffled copy's, or an extracted set's."""
    return ShuffleKey.from_dict(d) if d.get("kind") == "shuffle" else SetKey.from_dict(d)
