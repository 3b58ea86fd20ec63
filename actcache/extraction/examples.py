"""One sequence per example (``--packing none``): read, tokenize and check every example, then extract its rows.

Everything a run consumes is read and checked before the first forward pass: the kept columns (present and
scalar in every row), each example's length against ``--positions``. Examples keep dataset order in the shards
(shard i holds examples ``i * seqs_per_shard ...``); inside a shard they run in batches of similar length,
right-padded, with an attention mask. Right padding alone keeps a real token's activation as computed alone
(attention is causal and positions start at 0 on every row); the mask is passed as well. Only the selected rows
(``--positions``) are copied out of each batch, so a ``last`` set of N examples holds N rows.

A shard is plain safetensors (docs/probing.md): ``activations [n, rows, d]`` (with ``all``, ``[sum of lengths,
d]``: the real rows of each example one after another, no padding), ``tokens [sum of lengths]`` (each
example's ids one after another), ``lengths [n]``, ``example_index [n]`` (the row of the dataset), and per kept column
``column.NAME [n]`` (int64, float64 or bool) or, for strings, ``column.NAME.utf8`` (bytes) with
``column.NAME.offsets [n + 1]``.
"""

from __future__ import annotations

import array
import functools
import hashlib
import itertools
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from actcache.errors import ActcacheError, opt
from actcache.extraction.plan import HookSet, hook_selection
from actcache.extraction.positions import Positions, parse
from actcache.format import content, layout, manifest, moments, records, shard
from actcache.format.commit import Points, Shard, commit, rebuilding
from actcache.inputs import sources

if TYPE_CHECKING:
    import torch

    from actcache.extraction.plan import Plan

log = logging.getLogger(__name__)

COLUMN_TYPES = ("int", "float", "bool", "str")

SHARD_POINTS = Points(shard_written="examples.shard-written")
MANIFEST_POINTS = Points(before_manifest="manifest.before-write", manifest_written="manifest.written")


@dataclass
class Examples:
    """Every example of a run, tokenized and checked (``prepare``)."""

    ids: list[list[int]]
    """Token ids as fed to the model (BOS first when asked), at most ``context_size``."""
    index: list[int]
    """Each example's row in the dataset (rows with no token, no text, or text that tokenizes to nothing, are
    skipped, so indices can have gaps)."""
    truncated: int
    columns: dict[str, list[Any]] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)

    def digest(self) -> str:
        """What the shards store besides activations (ids, lengths, dataset rows, kept columns), hashed: the same
        whether the ids came from text or from ``--token-column`` (``format.content``)."""
        ids = (array.array("q", one).tobytes() for one in self.ids)  # one example at a time: no second copy
        return digest(self.types, list(map(len, self.ids)), ids, self.index, self.columns)

    def first_digest(self) -> str:
        """The same of the first example alone: the family's digest (``content.family_id``)."""
        first = self.ids[0]
        columns = {c: v[:1] for c, v in self.columns.items()}
        return digest(self.types, [len(first)], [array.array("q", first).tobytes()], self.index[:1], columns)


def digest(
    types: dict[str, str], lengths: list[int], ids: Iterable[bytes], index: list[int], columns: dict[str, list[Any]]
) -> str:
    """``Examples.digest`` of examples of ``lengths`` whose ids, one after another, are ``ids`` (int64 bytes, in
    pieces of any size): also what ``sets.backfill`` computes from a stored set's shards."""
    h = hashlib.sha256(json.dumps({"n": len(lengths), "types": types}, sort_keys=True).encode())
    h.update(array.array("q", lengths).tobytes())
    for piece in ids:
        h.update(piece)
    h.update(array.array("q", index).tobytes())
    for c in sorted(columns):
        h.update(json.dumps(columns[c]).encode())
    return h.hexdigest()


# -- reading rows with their columns -------------------------------------------------------------
def read_rows(
    source: sources.Source, columns: tuple[str, ...], token_column: str = ""
) -> Iterator[tuple[int, Any, dict[str, Any]]]:
    """(dataset row, text or None, {column: value}) for every row, in dataset order; a missing column is an error.
    With ``token_column``, its value as is takes the place of the text."""
    text_col = token_column or source.spec.text_column
    wanted = (text_col, *columns)
    if source.files is None:
        yield from _hf_rows(source, wanted, bool(token_column))
        return
    fs = sources._fs(source.spec)
    n = 0
    for path in source.files:
        name = os.path.basename(path)
        for where, row in _file_rows(fs, path, name, wanted):
            for c in wanted:
                if c not in row:
                    raise _missing(c, f"dataset file {name!r} {where}", row)
            value = row[text_col]
            text = value if token_column else sources._text(value, f"dataset file {name!r}", where, text_col)
            yield n, text, {c: row[c] for c in columns}
            n += 1


def _missing(column: str, where: str, row: Any) -> ActcacheError:
    return ActcacheError(
        f"column {column!r} is missing in {where}; its columns are {sorted(row)}: fix {opt('keep_columns')} "
        f"or {opt('text_column')}"
    )


def _file_rows(fs, path: str, name: str, wanted: tuple[str, ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    kind = sources._kind(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            have = pf.schema_arrow.names
            for c in wanted:
                if c not in have:
                    raise _missing(c, f"dataset file {name!r}", have)
            n = 0
            for batch in pf.iter_batches(columns=list(wanted), batch_size=1024):
                for row in batch.to_pylist():
                    n += 1
                    yield f"row {n}", row
        return
    with fs.open(path, "rb", compression="infer") as fh:
        if kind == "txt":
            for n, raw in enumerate(fh, 1):
                line = sources._utf8(raw, name, f"line {n}").rstrip("\r\n")
                yield f"line {n}", {"text": line if line.strip() else None}
            return
        if kind == "jsonl":
            for n, raw in enumerate(fh, 1):
                if raw.strip():
                    row = sources._json(sources._utf8(raw, name, f"line {n}"), name, f"line {n}")
                    yield f"line {n}", _object(row, name, f"line {n}")
            return
        data = sources._json(sources._utf8(fh.read(), name, None), name, "")
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else [data]
        for n, row in enumerate(data if isinstance(data, list) else [data], 1):
            yield f"item {n}", _object(row, name, f"item {n}")


def _object(row: Any, name: str, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise ActcacheError(f"dataset file {name!r} {where}: rows must be JSON objects, got {type(row).__name__}")
    return row


def _hf_rows(source: sources.Source, wanted: tuple[str, ...], raw: bool) -> Iterator[tuple[int, Any, dict[str, Any]]]:
    import datasets

    spec = source.spec
    try:
        ds = datasets.load_dataset(
            spec.path, spec.name, split=spec.split, revision=spec.revision, streaming=spec.streaming
        )
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ActcacheError(f"cannot load HF dataset {spec.path!r} ({first[:200]}); check {opt('dataset')}") from e
    cols = ds.column_names or list(getattr(ds, "features", None) or [])
    for c in wanted:
        if cols and c not in cols:
            raise _missing(c, f"HF dataset {spec.path!r}", cols)
    for n, row in enumerate(ds):
        value = row[wanted[0]]
        text = value if raw else sources._text(value, f"HF dataset {spec.path!r}", f"row {n + 1}", wanted[0])
        yield n, text, {c: row[c] for c in wanted[1:]}


# -- checking and tokenizing ------------------------------------------------------------------------
def _kind_of(value: Any) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    return None


def _column_type(name: str, kinds: set[str]) -> str:
    if kinds <= {"int", "float"} and kinds:
        return "float" if "float" in kinds else "int"
    if len(kinds) == 1:
        return next(iter(kinds))
    raise ActcacheError(
        f"{opt('keep_columns')}: column {name!r} mixes {' and '.join(sorted(kinds))} values; "
        "a kept column holds one scalar type"
    )


_PREPARED: dict[tuple, Examples] = {}
"""The last run's examples, by what fixes them: the plan checks them before Prefect starts, the task uses them."""


def prepare(plan: Plan, limit: int) -> Examples:
    """Read, tokenize, truncate and check the first ``limit`` examples (rows with text); nothing is written."""
    cfg = plan.config
    what = (plan.tokens_key.id, plan.resolved.dataset.fingerprint, cfg.kept_columns, cfg.positions, limit)
    if what not in _PREPARED:
        _PREPARED.clear()
        _PREPARED[what] = _prepare(plan, limit)
    return _PREPARED[what]


TOKENIZE_BATCH = 256
"""Rows read and tokenized at a time while examples are prepared."""


def _prepare(plan: Plan, limit: int) -> Examples:
    from actcache.extraction.tokens import tokenize_docs

    cfg, r = plan.config, plan.resolved
    tokenizer = r.model.tokenizer
    pos = parse(cfg.positions, cfg.context_size)
    cols = cfg.kept_columns
    found: list[list[int]] = []  # each example's token ids, before truncation
    ex = Examples([], [], 0, {c: [] for c in cols})
    rows = read_rows(r.dataset, cols, cfg.token_column)
    while len(found) < limit:
        # Rows are tokenized in batches of at most what is still wanted: a row with no token (a text that
        # tokenizes to nothing, as an empty list of ids) is skipped and does not count, and no row past the
        # last example is read.
        batch = [
            (n, _token_ids(text, n, cfg.token_column, r.id_bound) if cfg.token_column else text, values)
            for n, text, values in itertools.islice(rows, min(limit - len(found), TOKENIZE_BATCH))
        ]
        if not batch:
            break
        kept = [b for b in batch if b[1]]
        texts: list[Any] = [t for _, t, _ in kept]  # texts, or lists of token ids with --token-column
        tokenized = texts if cfg.token_column else tokenize_docs(texts, tokenizer)
        for (n, _, values), ids in zip(kept, tokenized, strict=True):
            if not ids:
                continue
            r.model.check_embedded(max(ids), f"a token of dataset row {n}")
            for c, v in values.items():
                if _kind_of(v) is None:
                    shown = "null" if v is None else f"{type(v).__name__} {str(v)[:40]!r}"
                    raise ActcacheError(
                        f"{opt('keep_columns')}: column {c!r} holds {shown} in dataset row {n}; a kept column "
                        "holds one scalar (int, float, bool or str) per example"
                    )
                if isinstance(v, int) and not isinstance(v, bool) and not -(1 << 63) <= v < 1 << 63:
                    raise ActcacheError(
                        f"{opt('keep_columns')}: column {c!r} holds the integer {v} in dataset row {n}, outside int64 "
                        "(the stored type); keep it as a string or a float column instead"
                    )
                if isinstance(v, str):
                    try:
                        size = len(v.encode())
                    except UnicodeEncodeError:
                        raise ActcacheError(
                            f"{opt('keep_columns')}: column {c!r} holds text that is not valid Unicode (a lone "
                            f"surrogate, {v[:40]!r}) in dataset row {n}; fix that row"
                        ) from None
                    if size > shard.TEXT_VALUE_LIMIT:
                        raise ActcacheError(
                            f"{opt('keep_columns')}: column {c!r} holds a text of {size} "
                            f"bytes in dataset row {n}; a kept text holds at most {shard.TEXT_VALUE_LIMIT} bytes per "
                            "example (readers count on it): keep a shorter column"
                        )
                ex.columns[c].append(v)
            found.append(ids)
            ex.index.append(n)
    if not found:
        raise ActcacheError(f"dataset {r.dataset.label!r} has no example with text in {r.dataset.spec.text_column!r}")
    for c in cols:
        kind = _column_type(c, {k for k in map(_kind_of, ex.columns[c]) if k is not None})  # all checked above
        ex.types[c] = kind
        if kind == "float":
            ex.columns[c] = [float(v) for v in ex.columns[c]]
    head = [r.bos_id] if cfg.prepend_bos and r.bos_id is not None else []  # the plan refused BOS without one
    body = cfg.context_size - len(head)
    for ids in found:
        if len(ids) > body:
            ex.truncated += 1
            ids = ids[:body] if cfg.truncate == "right" else ids[len(ids) - body :]
        ex.ids.append(head + list(ids))
    _check_lengths(ex, pos, cfg.prepend_bos)
    if ex.truncated:
        log.warning(
            "%d of %d examples were longer than %d tokens and truncated (%s end cut)",
            ex.truncated,
            len(ex.ids),
            cfg.context_size,
            cfg.truncate,
        )
    return ex


def _token_ids(value: Any, row: int, column: str, vocab: int | None) -> list[int] | None:
    """A pretokenized example: a list of token ids, each checked against the vocabulary (None: no tokens)."""
    if value is None or (isinstance(value, list) and not value):
        return None
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        shown = type(value).__name__ if not isinstance(value, list) else "a list with non-integers"
        raise ActcacheError(
            f"{opt('token_column')}: column {column!r} holds {shown} in dataset row {row}; it must hold lists of "
            "integer token ids"
        )
    bad = next((v for v in value if v < 0 or (vocab is not None and v >= vocab)), None)
    if bad is not None:
        raise ActcacheError(
            f"{opt('token_column')}: token id {bad} in dataset row {row} is outside the model's vocabulary "
            f"(0..{vocab - 1 if vocab else '?'}); were these ids made by another tokenizer?"
        )
    return value


def token_docs(source: sources.Source, column: str, vocab: int | None) -> Iterator[list[int]]:
    """The documents of ``column`` as token ids, in dataset order, each checked (``_token_ids``); rows with no ids
    are skipped, as rows with no text are: what ``--packing concat`` packs instead of tokenized texts."""
    for n, value, _ in read_rows(source, (), column):
        ids = _token_ids(value, n, column, vocab)
        if ids:
            yield ids


def _check_lengths(ex: Examples, pos: Positions, bos: bool) -> None:
    """Refuse an example too short for ``pos`` (naming it), before any forward pass."""
    if pos.kind == "list":
        head, tail = pos.reach()
        need = max(head, tail)
    else:
        need = 1
    for i, ids in enumerate(ex.ids):
        own = len(ids) - (1 if bos else 0)
        if own < 1 and pos.kind in ("last", "first", "mean"):
            raise ActcacheError(f"dataset row {ex.index[i]} has no token of its own; remove it")
        if len(ids) < need:
            raise ActcacheError(
                f"{opt('positions')} {pos.text} needs {need} tokens, but dataset row {ex.index[i]} has only "
                f"{len(ids)}; use positions that every example has (e.g. last, or -1) or drop short examples"
            )


# -- extracting ------------------------------------------------------------------------------------------
def batches(lengths: list[int], size: int) -> list[list[int]]:
    """Indices into ``lengths`` grouped ``size`` at a time by similar length (sorted, stable)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + size] for i in range(0, len(order), size)]


_FITS: dict[tuple, int] = {}
"""Examples per batch that fit, per model and hooks, after an out-of-memory error in this process."""


def compute_shard(plan: Plan, hooks: list[str], ids: list[list[int]]) -> dict[str, torch.Tensor]:
    """{hook: activations ``[n, rows, d]``} in the storage dtype, for examples in the given order; with positions
    ``all``, ``[sum of lengths, d]``: every example's real rows, one after another (no padding is stored).

    Per batch, the rows kept are gathered on the device by one index (the kept heads and dims first), cast there,
    and written to their places in the shard's rows (on the device) by one ``index_copy_``: no per-example work on
    tensors, one copy to the host per shard. On CUDA a batch that runs out of memory is split in two and redone,
    and no later batch of this process is larger (``_FITS``)."""
    import torch

    from actcache.extraction.forward import CPU_BATCH

    cfg = plan.config
    pos = parse(cfg.positions, cfg.context_size)
    rows = pos.n_rows(cfg.context_size)
    step = plan.extractor(hooks)
    lengths = [len(x) for x in ids]
    dtype = getattr(torch, cfg.dtype)
    sel = {h: hook_selection(cfg, h, plan.resolved.hooks[h].shape) for h in hooks}
    flat = pos.kind == "all"
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    n_out = starts[-1] if flat else len(ids) * rows
    # The shard's rows gather where the model runs and cross to the host once, at the end: no sync per batch.
    device = step.parts[0].device
    out = {h: torch.empty((n_out, math.prod(sel[h].kept_shape)), dtype=dtype, device=device) for h in hooks}
    pad = plan.resolved.pad_id if plan.resolved.pad_id is not None else 0
    todo = batches(lengths, cfg.batch_size or CPU_BATCH)
    todo.reverse()  # popped from the end: in order
    fits = (tuple(id(p._module) for p in step.parts), tuple(hooks))
    while todo:
        group = todo.pop()
        cap = _FITS.get(fits, len(group))
        if len(group) > cap:  # an earlier batch ran out of memory: none larger than half of it
            todo += [group[cap:], group[:cap]]
            continue
        lens = [lengths[i] for i in group]
        width = max(lens)
        tokens = torch.tensor([ids[i] + [pad] * (width - n) for i, n in zip(group, lens, strict=True)])
        mask = (torch.arange(width) < torch.tensor(lens)[:, None]).long()
        oom = None
        try:
            got = step.capture(tokens, mask)
        except torch.OutOfMemoryError as e:
            if len(group) == 1 or not all(p.adaptive for p in step.parts):
                raise
            oom = str(e).strip().split("\n")[0][:120]  # handled once the exception (and its tensors) are gone
        if oom is not None:
            log.warning(
                "out of memory with %d examples of up to %d tokens per pass; halving (%s)", len(group), width, oom
            )
            torch.cuda.empty_cache()
            _FITS[fits] = len(group) // 2
            todo += [group[len(group) // 2 :], group[: len(group) // 2]]
            continue
        src, dst, weights = _gather(group, lens, width, starts, pos, cfg.prepend_bos, rows)
        for h, act in got.items():
            act = sel[h].apply(act.reshape(act.shape[0], act.shape[1], -1))
            if weights is not None:  # mean: over each example's own tokens, in float32
                picked = torch.einsum("bp,bpd->bd", weights.to(act.device), act.float())
            else:
                picked = act.reshape(-1, act.shape[-1]).index_select(0, src.to(act.device))
            out[h].index_copy_(0, dst.to(device), picked.to(dtype))
    lead = (starts[-1],) if flat else (len(ids), rows)
    return {h: o.view(*lead, o.shape[-1]).cpu() for h, o in out.items()}


def _gather(
    group: list[int], lens: list[int], width: int, starts: list[int], pos: Positions, bos: bool, rows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """For one batch: the flat rows of ``[batch * width]`` kept, where they go in the output's rows, and for
    ``mean`` the weights ``[batch, width]`` of each example's own tokens instead of rows to gather."""
    import torch

    if pos.kind == "mean":
        first = torch.tensor([1 if bos and n > 1 else 0 for n in lens])
        ends = torch.tensor(lens)
        p = torch.arange(width)
        own = (p >= first[:, None]) & (p < ends[:, None])
        return torch.empty(0), torch.tensor(group), own.float() / (ends - first)[:, None].float()
    if pos.kind == "all":
        src = torch.cat([torch.arange(j * width, j * width + n) for j, n in enumerate(lens)])
        dst = torch.cat([torch.arange(starts[i], starts[i] + n) for i, n in zip(group, lens, strict=True)])
        return src, dst, None
    src_l: list[int] = []
    dst_l: list[int] = []
    for j, (i, n) in enumerate(zip(group, lens, strict=True)):
        at = pos.indices(n, bos)
        src_l += [j * width + k for k in at]
        dst_l += range(i * rows, i * rows + len(at))
    return torch.tensor(src_l), torch.tensor(dst_l), None


def shard_tensors(ex: Examples, lo: int, hi: int, context_size: int) -> dict[str, torch.Tensor]:
    """Everything but the activations for examples ``lo:hi``: tokens, lengths, dataset rows, kept columns."""
    import torch

    out = {
        "tokens": torch.tensor([t for ids in ex.ids[lo:hi] for t in ids], dtype=torch.int32),
        "lengths": torch.tensor([len(x) for x in ex.ids[lo:hi]], dtype=torch.int32),
        "example_index": torch.tensor(ex.index[lo:hi], dtype=torch.int64),
    }
    for c, kind in ex.types.items():
        values = ex.columns[c][lo:hi]
        if kind == "str":
            blobs = [v.encode() for v in values]
            offsets = [0]
            for b in blobs:
                offsets.append(offsets[-1] + len(b))
            out[f"column.{c}.utf8"] = torch.frombuffer(bytearray(b"".join(blobs)) or bytearray(1), dtype=torch.uint8)[
                : offsets[-1]
            ].clone()
            out[f"column.{c}.offsets"] = torch.tensor(offsets, dtype=torch.int64)
        else:
            out[f"column.{c}"] = torch.tensor(values, dtype={"int": torch.int64, "float": torch.float64}.get(kind))
    return out


def extract(plan: Plan) -> list[str]:
    """Extract every missing shard of every hook's set, then write their manifests; return the set URLs."""
    cfg = plan.config
    store = plan.store
    ex = prepare(plan, cfg.target_seqs)
    sps = plan.tokens_key.seqs_per_shard
    n = len(ex.ids)
    pos = parse(cfg.positions, cfg.context_size)
    rows = 1 if pos.kind == "all" else pos.n_rows(cfg.context_size)  # records count stored rows
    spans = [(lo, min(lo + sps, n)) for lo in range(0, n, sps)]
    if n < cfg.target_seqs and plan.computed:  # the dataset ended first: remembered where the plan looks
        store.write_json(f"{layout.tokens_dir(plan.tokens_key.id)}/{layout.END}", records.sealed({"n_seq": n}))
    # Shard i is encoded and stored by a writer thread while shard i + 1 runs through the model; at most one shard
    # waits there (memory: two shards), and a failure to store it is raised here, before the next is handed over.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="actcache-examples-store")
    pending: Future | None = None
    try:
        for index, (lo, hi) in enumerate(spans):
            if index % plan.partition[1] != plan.partition[0]:
                continue
            todo = [s for s in plan.computed if not records.scan_set(store, s.key).is_done(index, hi - lo)]
            if not todo:
                continue
            acts = compute_shard(plan, [s.hook for s in todo], ex.ids[lo:hi])
            rest = shard_tensors(ex, lo, hi, cfg.context_size)
            if pending is not None:
                pending.result()
            pending = pool.submit(_store_shard, plan, todo, index, hi - lo, rows, acts, rest)
        if pending is not None:
            pending.result()
    finally:
        pool.shutdown(wait=True)
    return write_manifests(plan, ex)


def _store_shard(
    plan: Plan, todo: list, index: int, n: int, rows: int, acts: dict[str, torch.Tensor], rest: dict[str, torch.Tensor]
) -> None:
    """Encode shard ``index`` (``n`` examples) of each set in ``todo`` and store it: bytes, then the record."""
    cfg, store = plan.config, plan.store
    for s in todo:
        key = s.key
        a = acts[s.hook]
        enc = shard.encode(
            {"activations": a, **rest},
            codec=key.codec,
            level=key.codec_level,
            metadata={"set_id": key.id, "hook": key.hook, "index": str(index)},
        )
        rel = layout.shard_file(index, key.codec)
        kept = hook_selection(cfg, s.hook, s.hook_shape).kept_shape
        extra = {
            "set_id": key.id,
            "stats": shard.stats(a),
            moments.RECORD_FIELD: moments.of(a).to_json(),  # the manifest's stats: normalising readers
            "hook_shape": list(kept),
        }
        record = records.Record(index, rel, n, a.shape[0] * rows, enc.sha256, len(enc.data), extra)
        commit(store, key.id, [Shard(record, enc.data)], points=SHARD_POINTS)  # bytes, then the record


def write_manifests(plan: Plan, ex: Examples | None = None) -> list[str]:
    """Each set's manifest: the shards, and what an example set adds (positions, rows, truncated, columns).
    ``ex``: the examples as prepared (read again when None, as a fan-out's parent does)."""
    from actcache.inputs.model import hook_layer

    cfg = plan.config
    ex = ex or prepare(plan, cfg.target_seqs)
    n_shards = -(-len(ex.ids) // plan.tokens_key.seqs_per_shard)
    store = plan.store
    rows = parse(cfg.positions, cfg.context_size).n_rows(cfg.context_size)
    digest, first = ex.digest(), ex.first_digest()

    def publish(s: HookSet) -> None:
        scan = records.scan_set(store, s.key)
        recs = [r for r in scan.sorted_records() if r.index < n_shards]
        sel = hook_selection(cfg, s.hook, s.hook_shape)
        provenance = {
            **plan.provenance,
            "hook": s.hook,
            "layer": hook_layer(s.hook),
            "hook_shape": list(sel.kept_shape),
            "selection": {"full_hook_shape": list(sel.shape), "heads": sel.heads, "dims": sel.dims},
        }
        m = manifest.build(
            s.key, provenance, [moments.without(r) for r in recs], target_seqs=len(ex.ids), previous=scan.consolidated
        )
        m |= moments.merged(  # {} when a shard written before examples kept moments has none
            recs,
            m["d"],
            full=lambda r, k=s.key: r.n_seq == k.tokens.seqs_per_shard,  # type: ignore[misc]
            previous=scan.consolidated,
            moments_of=moments.from_records(store, s.set_id, m["d"]),
        )
        done = sum(r.n_seq for r in recs)
        flat = rows == cfg.context_size and parse(cfg.positions, cfg.context_size).kind == "all"
        m["target_tokens"] = sum(map(len, ex.ids)) if flat else len(ex.ids) * rows
        m["complete"] = done >= len(ex.ids)
        m["examples"] = {
            "packing": "none",
            "n_examples": done,
            "positions": parse(cfg.positions, cfg.context_size).text,
            "rows_per_example": None if flat else rows,
            "truncate": cfg.truncate,
            "truncated": ex.truncated,
            "columns": dict(ex.types),
            content.MANIFEST_FIELD: content.content_id(s.key, digest),
            content.FAMILY_FIELD: content.family_id(s.key, first),
        }
        content.publish(store, s.set_id, m, m["examples"][content.MANIFEST_FIELD], scan.consolidated, MANIFEST_POINTS)

    for s in plan.computed:  # (a set reused from another holds its own manifest)
        store.sweep_temp(s.set_id)  # what killed writers left behind
        rebuilding(functools.partial(publish, s))
    return plan.urls
