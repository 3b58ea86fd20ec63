"""``actcache stats SET``: a set's normalisation statistics, computed once for sets written without them.

Sets extracted since statistics exist carry them in ``manifest["stats"]`` (see ``moments``). For an older set,
``compute`` reads every shard once (one at a time, checksum verified), merges the moments in shard-index
order exactly as extraction does, and rewrites the manifest with ``stats`` and ``moments`` added and nothing
else changed, in one atomic write. A set whose manifest has stats but not the moments by token group
(``moments["by_token"]``, what a reader that excludes special tokens or BOS positions normalises with) gets
them the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from actcache.errors import ActcacheError, Failure
from actcache.format.commit import commit
from actcache.format.records import Record
from actcache.read.exclude import special_ids
from actcache.read.reader import ActivationSet, open_set
from actcache.storage import leases
from actcache.storage.store import StoreRef

if TYPE_CHECKING:
    from actcache.format import moments


def full_size(m: dict[str, Any]) -> int:
    """``n_seq`` of a shard that has its final size (rows per shard for a "rows" set)."""
    key = m["key"]
    return key["rows_per_shard"] if m.get("layout") == "rows" else key["tokens"]["seqs_per_shard"]


def _shard_moments(s: ActivationSet, r: Record) -> tuple[moments.Moments, moments.ByToken | None]:
    import torch  # torch: imported only when shards are read (stats in the manifest: < 1 s)

    from actcache.format import moments

    sh = s.read(r, verify=True)
    ctx = s.context_size
    if ctx is None:
        return moments.of(sh.activations), None
    tokens = sh.tokens.reshape(-1)
    first = sh.positions % ctx == 0 if sh.positions is not None else torch.arange(len(tokens)) % ctx == 0
    ids = special_ids(s.tokenization)
    return moments.of(sh.activations), moments.by_token(sh.activations, tokens, first, ids)


def compute(src: str | StoreRef, *, on_shard=None, on_total=None) -> dict[str, Any]:
    """The set's ``manifest["stats"]``; computed from its shards and written into its manifest if missing.

    ``src``: the set's URL, or its ``StoreRef`` where the store needs options or a credentials block."""
    s = open_set(src)
    m = s.manifest
    if isinstance(m.get("stats"), dict) and "by_token" in (m.get("moments") or {}):
        return m["stats"]
    with leases.hold(s.store, s.set_id):  # it rewrites the manifest: `rm` refuses the set meanwhile
        fields = _computed(s, on_shard, on_total)
        _unchanged(src, s.url, m)
        commit(s.store, s.set_id, manifest_doc={**m, **fields})  # not onto a set removed while it was read
    return fields["stats"]


def _computed(s: ActivationSet, on_shard, on_total) -> dict[str, Any]:
    """The manifest fields ``stats`` and ``moments`` of set ``s``, from every shard read once."""
    m = s.manifest
    size = full_size(m)
    groups: dict[int, moments.ByToken | None] = {}
    if on_total:
        on_total(len(s.records))

    def moments_of(r: Record) -> moments.Moments:
        out, groups[r.index] = _shard_moments(s, r)
        if on_shard:
            on_shard(r)
        return out

    from actcache.format import moments

    return moments.merged(
        s.records,
        m["d"],
        full=lambda r: r.n_seq == size,
        previous=None,
        moments_of=moments_of,
        by_token_of=lambda r: groups.pop(r.index),  # called right after moments_of(r)
    )


def _unchanged(src: str | StoreRef, url: str, m: dict[str, Any]) -> None:
    """Refuse to write over a manifest that another writer replaced while the shards were read (an extension of
    the set: the old manifest with statistics added would drop its new shards)."""
    try:
        now = open_set(src).manifest
    except ActcacheError:
        return  # removed or damaged meanwhile: commit's own check of the shards says so, or writes a whole one
    if now != m:
        raise Failure(
            f"{url} changed while its statistics were computed (another run extended or rewrote it); "
            "its manifest is left as that run wrote it: run `actcache stats` again"
        )


def summary(st: dict[str, Any], d: int) -> str:
    """A few lines for a person; the full vectors are in the manifest (``actcache show``)."""
    if not st["n"]:
        return f"rows: 0 finite (NaN: {st['nan']}, Inf: {st['inf']})"
    var = st["var"]
    lines = [
        f"rows: {st['n']}  d: {d}  NaN: {st['nan']}  Inf: {st['inf']}",
        f"mean L2 norm: {st['mean_norm']:.6g}  mean squared L2 norm: {st['mean_sq_norm']:.6g}",
        f"scale (sqrt(d) / mean L2 norm): {st['scale']:.6g}" if st["scale"] is not None else "scale: undefined",
        f"per-dimension mean: min {min(st['mean']):.6g}  max {max(st['mean']):.6g}",
        f"per-dimension variance: min {min(var):.6g}  max {max(var):.6g}  mean {sum(var) / len(var):.6g}",
    ]
    return "\n".join(lines)
