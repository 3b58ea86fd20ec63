"""A shard of an example set (``--packing none``) as flat rows, for ``ActivationDataset``.

Each stored activation row becomes one dataset row, with what a trainer may ask beside it: the token at that row,
its position (``example * context_size + position``, the example counted in the set's order, as ``load_examples``
lays them out) and the kept columns of its example (one example's values repeated on each of its rows). A ``mean``
row has no token and no position: asking for them, or excluding rows by token, is refused on such a set.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from actcache.errors import ActcacheError, Failure
from actcache.extraction.positions import parse
from actcache.format.records import Bounds, Record
from actcache.read.reader import ActivationSet

STRING_BITS = 32
"""A string column travels through the batch as ``shard << STRING_BITS | example``, turned into text at the end."""


@dataclass
class ExampleRows:
    acts: torch.Tensor
    """``[rows, d]``: every stored row, example after example."""
    tokens: torch.Tensor | None
    """``[rows]`` int32: the token at each row (None for ``mean``)."""
    positions: torch.Tensor | None
    """``[rows]`` int64: ``example * context_size + position`` (None for ``mean``)."""
    columns: dict[str, torch.Tensor]
    """``[rows]`` per kept column: numbers and bools as stored, strings as codes (see ``STRING_BITS``)."""
    strings: dict[str, list[str]]
    """The shard's values of each string column, one per example."""
    example: torch.Tensor
    """``[rows]`` int64: each row's example, counted in the set's order (its row in ``load_examples``)."""
    example_index: torch.Tensor
    """``[rows]`` int64: each row's example's row in the dataset."""


def is_examples(s: ActivationSet) -> bool:
    return bool(s.manifest.get("examples"))


def check_reader(s: ActivationSet, *, with_tokens: bool, with_positions: bool, exclude: bool) -> None:
    """What a reader of example set ``s`` may ask: a ``mean`` row has no token nor position."""
    if s.manifest["examples"].get("positions") != "mean":
        return
    asked = [n for n, on in (("with_tokens", with_tokens), ("with_positions", with_positions)) if on]
    asked += ["exclusions by token"] if exclude else []
    if asked:
        raise ActcacheError(
            f"set {s.url} stores the mean over each example's tokens (--positions mean): its rows have no single "
            f"token or position, so {' and '.join(asked)} cannot apply; leave them out"
        )


def column_types(s: ActivationSet) -> dict[str, str]:
    """The set's kept columns and their types (int, float, bool, str)."""
    return dict(s.manifest["examples"].get("columns") or {})


def column_dtype(kind: str) -> torch.dtype:
    return {"int": torch.int64, "float": torch.float64, "bool": torch.bool}.get(kind, torch.int64)


def first_examples(s: ActivationSet) -> list[int]:
    """The set-wide ordinal of each shard's first example."""
    out = [0]
    for r in s.records[:-1]:
        out.append(out[-1] + r.n_seq)
    return out


def expect(s: ActivationSet, record: Record) -> dict[str, tuple[torch.dtype, tuple[int, ...] | None]]:
    """Each tensor of shard ``record`` as the key, manifest and record fix it: dtype, and shape where known (the
    width ``d`` is the hook's after --heads and --dims; the rows, the record's)."""
    from actcache.format import shard

    n, d = record.n_seq, s.d
    rows = Bounds.of(s.key).context_size  # the key's --positions: 0 for all, every example's rows in a row
    flat = rows == 0
    out: dict[str, tuple[torch.dtype, tuple[int, ...] | None]] = {
        "activations": (shard.TORCH_DTYPES[s.key.dtype], (record.n_tokens, d) if flat else (n, rows, d)),  # type: ignore[union-attr]
        "tokens": (torch.int32, (record.n_tokens,) if flat else None),
        "lengths": (torch.int32, (n,)),
        "example_index": (torch.int64, (n,)),
    }
    for name, kind in column_types(s).items():
        if kind == "str":
            out[f"column.{name}.utf8"] = (torch.uint8, None)
            out[f"column.{name}.offsets"] = (torch.int64, (n + 1,))
        else:
            out[f"column.{name}"] = (column_dtype(kind), (n,))
    return out


def decode(s: ActivationSet, record: Record, data) -> dict[str, torch.Tensor]:
    """Shard ``record``'s tensors, its header checked against ``expect`` before any is made (a mismatch is damage,
    said in one line) and its lengths against the context and the tokens stored."""
    from actcache.format import shard

    try:
        t = shard.decode(data, codec=s.manifest["codec"], expect=expect(s, record), cap=s.shard_cap(len(data)))  # type: ignore[arg-type]
        lengths = t["lengths"]
        ctx = s.context_size or 0
        if len(lengths) and not (int(lengths.min()) >= 1 and int(lengths.max()) <= ctx):
            raise ValueError(f"an example length is outside 1..{ctx}")
        if int(lengths.sum()) != t["tokens"].numel():
            raise ValueError(f"its lengths add up to {int(lengths.sum())} tokens, it holds {t['tokens'].numel()}")
        for name, kind in column_types(s).items():
            if kind != "str":
                continue
            offsets = t[f"column.{name}.offsets"]
            if int(offsets[-1]) != t[f"column.{name}.utf8"].numel() or int(offsets[0]) != 0:
                raise ValueError(f"column {name!r}'s offsets do not end where its text does")
            sizes = offsets.diff()
            if len(sizes) and (int(sizes.min()) < 0 or int(sizes.max()) > shard.TEXT_VALUE_LIMIT):
                raise ValueError(
                    f"column {name!r} holds a value of {int(sizes.abs().max())} bytes; a kept text holds 0 to "
                    f"{shard.TEXT_VALUE_LIMIT}"
                )
    except ValueError as e:  # the header's shapes or dtypes, the lengths: not what this set wrote
        raise Failure(
            f"shard {record.index} of {s.url} is damaged ({e}{s.unbounded_why(e)}); run `actcache verify`, then rerun "
            "the extraction to repair it"
        ) from e
    return t


def read(s: ActivationSet, record: Record, first_example: int, *, verify: bool) -> ExampleRows:
    """Shard ``record`` of example set ``s`` as rows (its tensors views of the bytes read where they can be)."""
    s.check_stored_size(record)
    data = s.store.read_mapped(f"{s.set_id}/{record.file}", size=record.bytes)
    if verify and hashlib.sha256(data).hexdigest() != record.sha256:
        raise Failure(f"shard {record.index} of {s.url} fails its checksum; rerun the extraction to repair it")
    t = decode(s, record, data)
    lengths = t["lengths"].long()
    n = len(lengths)
    acts = t["activations"].reshape(-1, s.d)
    info = s.manifest["examples"]
    ctx = s.context_size
    assert ctx is not None  # an example set is an extraction's: its key holds the context size
    if len(acts) != record.n_tokens or n != record.n_seq:
        raise Failure(f"shard {record.index} of {s.url} holds other rows than its record; rerun the extraction")
    spec = parse(info["positions"], ctx)
    if spec.kind == "all":
        per = lengths
        starts = torch.cumsum(lengths, 0) - lengths
        within = torch.arange(len(acts)) - torch.repeat_interleave(starts, per)
        tokens: torch.Tensor | None = t["tokens"]
    elif spec.kind == "mean":
        per, within, tokens = torch.ones(n, dtype=torch.long), None, None
    else:
        bos = bool(s.tokenization.get("prepend_bos"))
        k = len(acts) // max(n, 1)
        per = torch.full((n,), k, dtype=torch.long)
        within = torch.tensor([i for m in lengths.tolist() for i in spec.indices(m, bos)], dtype=torch.long)
        flat_start = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, per)
        tokens = t["tokens"][flat_start + within]
    example = torch.repeat_interleave(torch.arange(n), per)
    positions = None if within is None else (first_example + example) * ctx + within
    columns: dict[str, torch.Tensor] = {}
    strings: dict[str, list[str]] = {}
    for name, kind in column_types(s).items():
        if kind == "str":
            raw, o = bytes(t[f"column.{name}.utf8"].numpy().tobytes()), t[f"column.{name}.offsets"].tolist()
            strings[name] = [raw[o[i] : o[i + 1]].decode() for i in range(n)]
            columns[name] = (record.index << STRING_BITS) | example
        else:
            columns[name] = torch.repeat_interleave(t[f"column.{name}"], per)
    return ExampleRows(
        acts,
        tokens,
        positions,
        columns,
        strings,
        first_example + example,
        torch.repeat_interleave(t["example_index"], per),
    )
