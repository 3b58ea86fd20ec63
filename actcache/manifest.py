"""The manifest: a JSON view of a set consolidated from its completion records (written last).

It says exactly how to reproduce the set (model, hook, dataset, tokenization, encoding, versions) and
lists every shard with its checksum. It never holds the store URL, storage options or credentials.
"""

from __future__ import annotations

import datetime as dt
from importlib import metadata
from typing import Any

from actcache import layout, records
from actcache.errors import ActcacheError
from actcache.key import CODECS, DTYPES, FORMAT_VERSION, SetKey, ShuffleKey, key_from_dict
from actcache.store import Store

_PACKAGES = ("actcache", "torch", "transformers", "transformer-lens", "safetensors", "tokenizers", "zstandard")


def versions() -> dict[str, str]:
    out = {}
    for p in _PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "unknown"
    return out


def build(key: SetKey, provenance: dict[str, Any], recs: list[records.Record], *, target_seqs: int,
          previous: dict[str, Any] | None = None) -> dict[str, Any]:
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    n_tokens = sum(r.n_tokens for r in recs)
    hook_shape = provenance.get("hook_shape") or (recs[0].extra.get("hook_shape") if recs else None)
    d = 1
    for s in hook_shape or [0]:
        d *= s
    return {
        "format_version": FORMAT_VERSION,
        "set_id": key.id,
        "key": key.to_dict(),
        **{k: v for k, v in provenance.items() if k != "format_version"},
        "hook_shape": hook_shape,
        "d": d,
        "dtype": key.dtype,
        "model_dtype": key.model_dtype,
        "codec": key.codec,
        "codec_level": key.codec_level,
        "shard_tokens": key.tokens.shard_tokens,
        "versions": versions(),
        "n_shards": len(recs),
        "n_tokens": n_tokens,
        "bytes": sum(r.bytes for r in recs),
        "target_tokens": target_seqs * key.tokens.context_size,
        "complete": n_tokens >= target_seqs * key.tokens.context_size,
        "created_at": (previous or {}).get("created_at", now),
        "updated_at": now,
        "shards": [r.to_dict() for r in recs],
    }


def read(store: Store, set_id: str) -> dict[str, Any]:
    """A set's manifest, checked to be one this version can read."""
    if not layout.SET_ID_RE.match(set_id):
        raise ActcacheError(f"{set_id!r} is not a set id (24 hex characters)")
    try:
        m = store.read_json(f"{set_id}/{layout.MANIFEST}")
    except FileNotFoundError:
        raise ActcacheError(f"no activation set at {store.url_of(set_id)} (no manifest.json)") from None
    except ValueError as e:
        raise ActcacheError(f"manifest of {store.url_of(set_id)} is not valid JSON ({e})") from None
    version = m.get("format_version") if isinstance(m, dict) else None
    if not isinstance(version, int):
        raise ActcacheError(f"manifest of {store.url_of(set_id)} has no format_version; it is not an actcache set")
    if version > FORMAT_VERSION:
        raise ActcacheError(f"set {set_id} has format version {version}, newer than this actcache reads "
                            f"({FORMAT_VERSION}); upgrade actcache")
    try:
        key = key_from_dict(m["key"])
        _check_encoding(m, key)
        for r in m["shards"]:
            rec = records.Record.from_dict(r)
            if rec.file != layout.shard_file(rec.index, m["codec"]):
                raise ValueError(f"shard {rec.index} names the file {rec.file!r}")
    except (KeyError, TypeError, ValueError) as e:
        raise ActcacheError(f"manifest of {store.url_of(set_id)} is malformed ({e}); regenerate it with "
                            "`actcache extract` using the same settings") from None
    if key.id != set_id:
        raise ActcacheError(f"manifest of {store.url_of(set_id)} does not match its set id (edited by hand?); "
                            "regenerate it with `actcache extract` using the same settings")
    return m


def _check_encoding(m: dict[str, Any], key: SetKey | ShuffleKey) -> None:
    """What the reader sizes and decodes shards with must be a known encoding, and the key's own."""
    if isinstance(key, ShuffleKey):  # a "rows" set: [n_rows, d] shards, uncompressed, in the source's dtype
        d = m.get("d")
        if m.get("layout") != "rows" or m.get("dtype") not in DTYPES or m.get("codec") != "none" \
                or type(d) is not int or d < 1:
            raise ValueError("a shuffled set needs layout 'rows', a known dtype, codec 'none' and a positive d")
        return
    if key.dtype not in DTYPES or key.codec not in CODECS:
        raise ValueError(f"unknown dtype {key.dtype!r} or codec {key.codec!r}")
    if m.get("dtype") != key.dtype or m.get("codec") != key.codec:
        raise ValueError("dtype/codec differ from the key's")
    ctx, d = key.tokens.context_size, m.get("d")
    if type(ctx) is not int or ctx < 1 or type(d) is not int or d < 1:
        raise ValueError(f"context_size {ctx!r} and d {d!r} must be positive integers")
