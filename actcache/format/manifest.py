"""The manifest: a JSON view of a set consolidated from its completion records (written last).

It says exactly how to reproduce the set (model, hook, dataset, tokenization, encoding, versions) and
lists every shard with its checksum. It never holds the store URL, storage options or credentials.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from importlib import metadata
from typing import Any

from actcache.errors import ActcacheError, Failure
from actcache.format import layout, records
from actcache.format.key import CODECS, DTYPES, FORMAT_VERSION, SetKey, ShuffleKey, key_from_dict
from actcache.storage.store import DamagedFile, Store

_PACKAGES = ("actcache", "torch", "transformers", "transformer-lens", "safetensors", "tokenizers", "zstandard")


def versions() -> dict[str, str]:
    out = {}
    for p in _PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "unknown"
    return out


def non_finite(shards: list[dict[str, Any]]) -> dict[str, int]:
    """NaN and Inf values over a set's shards (from their records' stats), and how many shards hold any."""
    nan = inf = bad = 0
    for r in shards:
        st = (r.get("extra") or {}).get("stats") or {} if isinstance(r, dict) else {}
        n, i = st.get("nan", 0), st.get("inf", 0)
        n, i = (n if type(n) is int else 0), (i if type(i) is int else 0)
        nan, inf, bad = nan + n, inf + i, bad + bool(n or i)
    return {"nan": nan, "inf": inf, "shards": bad}


def describe_non_finite(m: dict[str, Any]) -> str | None:
    """One line about a set's NaN/Inf values and what to do, or None when it has none."""
    nf = non_finite(m.get("shards") or [])
    if not (nf["nan"] or nf["inf"]):
        return None
    from actcache.format.shard import non_finite_hint

    source_finite = m.get("non_finite", {}).get("source_finite", nf["nan"] == 0)
    return (
        f"{nf['inf']} Inf and {nf['nan']} NaN values in {nf['shards']} of {len(m['shards'])} shards: "
        + non_finite_hint(m.get("dtype", ""), bool(source_finite))
    )


def build(
    key: SetKey,
    provenance: dict[str, Any],
    recs: list[records.Record],
    *,
    target_seqs: int,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    n_tokens = sum(r.n_tokens for r in recs)
    hook_shape = provenance.get("hook_shape") or (recs[0].extra.get("hook_shape") if recs else None)
    d = 1
    for s in hook_shape or [0]:
        d *= s
    shards = [r.to_dict() for r in recs]
    source_finite = all(r.extra.get("source_finite", True) for r in recs)
    return records.sealed(
        {
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
            "non_finite": {**non_finite(shards), "source_finite": source_finite},
            "target_tokens": target_seqs * key.tokens.context_size,
            "complete": n_tokens >= target_seqs * key.tokens.context_size,
            "created_at": (previous or {}).get("created_at", now),
            "updated_at": now,
            "shards": shards,
        }
    )


def write(store: Store, set_id: str, m: dict[str, Any]) -> None:
    """Write a set's manifest, sealed (``records.SEAL``) over all its fields: the one way manifests are written, so
    a field added after ``build`` (statistics, a shuffled set's own) is covered by the seal too."""
    store.write_json(f"{set_id}/{layout.MANIFEST}", records.sealed(m))


# Fields a rewrite changes by itself: when only these would differ, the manifest on store is left as it is.
_CLOCK_FIELDS = ("updated_at", "versions", records.SEAL)


def unchanged(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether manifest ``new`` says what ``old`` (as stored) says, but for when and by which versions: a run that
    computed nothing leaves the stored manifest (and its ``updated_at``) as it was."""
    if old is None:
        return False
    new = json.loads(json.dumps(new))  # as stored: lists, not tuples
    return {k: v for k, v in old.items() if k not in _CLOCK_FIELDS} == {
        k: v for k, v in new.items() if k not in _CLOCK_FIELDS
    }


def scrub(m: dict[str, Any]) -> dict[str, Any]:
    """``m`` with credentials in URLs redacted (``secrets.redact``, the one rule) in every field but the key (which
    holds fingerprints, and which the set id hashes), resealed when anything changed. Manifests written before
    inputs were checked for credentials may hold a dataset or endpoint URL with its password: it is never shown,
    copied or published again."""
    from actcache.storage.secrets import redact

    def clean(v: Any) -> Any:
        if isinstance(v, str):
            return redact(v)
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    out = {k: v if k in ("key", records.SEAL) else clean(v) for k, v in m.items()}
    return m if out == m else records.sealed(out)


def stored_bytes(store: Store, set_id: str) -> bytes:
    """A set's manifest as stored, to copy or publish: byte for byte, unless it holds a credential (``scrub``)."""
    from actcache.storage.store import JSON_LIMIT, dump_json, parse_json

    raw = store.read_bytes(f"{set_id}/{layout.MANIFEST}", limit=JSON_LIMIT)
    m = parse_json(raw, store.url_of(set_id))
    clean = scrub(m) if isinstance(m, dict) else m
    return raw if clean is m else dump_json(clean)


class NoManifest(ActcacheError):
    """The set has no manifest.json (yet): a run is in progress, or the URL is wrong."""


class UnfinishedSet(Failure, NoManifest):
    """No manifest.json, but shards or records of a run: a failure the rerun it names finishes (exit 1), not bad
    input."""


def _missing(store: Store, set_id: str) -> NoManifest:
    """Why there is no manifest to read: nothing there, or an unfinished set (what it has, how to finish it)."""
    url = store.url_of(set_id)
    try:
        files = store.listing(set_id)
    except Exception:
        files = {}
    if not files:
        return NoManifest(f"no activation set at {url} (no manifest.json)")
    recorded = sum(layout.parse_record_file(rel) is not None for rel in files)
    # Only a shuffle writes spill files, and it keeps them until its manifest is in: extract cannot finish it.
    command = "shuffle" if any(rel.startswith(layout.SPILL + "/") for rel in files) else "extract"
    writer = "a shuffle" if command == "shuffle" else "an extraction"
    return UnfinishedSet(
        f"{url} is an unfinished set: {recorded} shard(s) recorded, but no manifest.json yet ({writer} "
        f"running or interrupted, or an interrupted `actcache rm`); rerun the same `actcache {command}` to finish "
        f"it, or `actcache rm {url}` to remove it"
    )


def read(store: Store, set_id: str) -> dict[str, Any]:
    """A set's manifest, checked to be one this version can read, and against the key its set id hashes."""
    if not isinstance(set_id, str) or not layout.SET_ID_RE.match(set_id) or set_id.startswith("t"):
        hint = ""
        if isinstance(set_id, str) and set_id and "/" not in set_id and not set_id.startswith("."):
            hint = f"; if {store.url_of(set_id)} is a store, `actcache ls {store.url_of(set_id)}` lists its sets"
        raise ActcacheError(f"{set_id!r} is not a set id (24 hex characters){hint}")
    url = store.url_of(set_id)
    rebuild = "rerun the same `actcache extract` to rebuild it from the completion records"
    try:
        m = store.read_json(f"{set_id}/{layout.MANIFEST}")
    except FileNotFoundError:
        raise _missing(store, set_id) from None
    except DamagedFile as e:  # a failure (exit 1) as the file's own error says, not bad input: a rerun repairs it
        raise Failure(f"manifest of {url} is damaged ({e}); {rebuild}") from e
    version = m.get("format_version") if isinstance(m, dict) else None
    if type(version) is not int:
        raise Failure(f"manifest of {url} has no format_version; it is not an actcache set ({rebuild})")
    if version > FORMAT_VERSION:
        raise ActcacheError(
            f"set {set_id} has format version {version}, newer than this actcache reads "
            f"({FORMAT_VERSION}); upgrade actcache"
        )
    try:
        key = key_from_dict(m["key"])
        if key.id != set_id or m.get("set_id", set_id) != set_id:  # first: what else it says is about another set
            raise _EditedByHand(url)
        _check_encoding(m, key)
        recs = records.records_of(m["shards"], records.Bounds.of(key))
        if m.get("n_tokens") != sum(r.n_tokens for r in recs.values()) or m.get("bytes") != sum(
            r.bytes for r in recs.values()
        ):
            raise ValueError("its totals differ from its shards")
        records.check_sealed(m, "it")  # last: the specific complaints above say more
    except (KeyError, TypeError, ValueError) as e:  # damage a rerun repairs, as a damaged shard is: exit 1
        raise Failure(
            f"manifest of {url} is malformed ({e}); regenerate it with "
            f"`actcache extract` using the same settings: {rebuild}"
        ) from e
    return scrub(m)


class _EditedByHand(Failure):
    def __init__(self, url: str):
        super().__init__(
            f"manifest of {url} does not match its set id (edited by hand?); "
            "regenerate it with `actcache extract` using the same settings"
        )


def _check_encoding(m: dict[str, Any], key: SetKey | ShuffleKey) -> None:
    """What the reader sizes and decodes shards with must be a known encoding, and the key's own."""
    if isinstance(key, ShuffleKey):  # a "rows" set: [n_rows, d] shards, uncompressed, in the source's dtype
        d = m.get("d")
        if (
            m.get("layout") != "rows"
            or m.get("dtype") not in DTYPES
            or m.get("codec") != "none"
            or type(d) is not int
            or d < 1
        ):
            raise ValueError("a shuffled set needs layout 'rows', a known dtype, codec 'none' and a positive d")
        from actcache.format.width import key_width

        check_width(m, key, d, key_width(key, m, fetch=False))
        return
    if key.dtype not in DTYPES or key.codec not in CODECS:
        raise ValueError(f"unknown dtype {key.dtype!r} or codec {key.codec!r}")
    if m.get("dtype") != key.dtype or m.get("codec") != key.codec or m.get("hook") != key.hook:
        raise ValueError("dtype/codec/hook differ from the key's")
    ctx, sps, d, shape = key.tokens.context_size, key.tokens.seqs_per_shard, m.get("d"), m.get("hook_shape")
    if not m.get("shards") and shape is None:
        return  # nothing stored yet: nothing to size
    if not all(type(v) is int and v >= 1 for v in (ctx, sps, d)):
        raise ValueError(f"context_size {ctx!r}, seqs_per_shard {sps!r} and d {d!r} must be positive integers")
    if not (
        isinstance(shape, list) and shape and all(type(v) is int and v >= 1 for v in shape) and math.prod(shape) == d
    ):
        raise ValueError(f"hook_shape {shape!r} does not multiply to d={d}")
    from actcache.format.width import key_width

    # Only what this machine holds: reading a manifest never waits on the hub (the reader of shards may fetch).
    check_width(m, key, d, key_width(key, m, fetch=False))


def check_width(m: dict[str, Any], key: SetKey | ShuffleKey, d: int, bound: int | None) -> None:
    """Refuse a manifest whose ``d`` is wider than ``bound``, what a true shard of its key holds per token."""
    if bound is not None and d > bound:
        hook = m.get("hook") if isinstance(key, ShuffleKey) else key.hook
        raise ValueError(
            f"d={d} is wider than a true shard of its key: {hook} of the key's model holds at most {bound} values "
            "per token (forged or edited)"
        )
