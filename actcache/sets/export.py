"""``actcache export SET OUT --format saelens|hf``: a set as a Hugging Face ``datasets`` folder that trainers load.

``saelens`` writes what SAELens's ``CacheActivationsRunner`` writes (checked against SAELens 6.54): one row per
sequence, a column named after the hook with ``Array2D(shape=(context_size, d), dtype)`` and ``token_ids``
as ``Sequence(Value("int32"), length=context_size)``; flat ``data-NNNNN-of-MMMMM.arrow`` files,
``dataset_info.json`` and a ``state.json`` with the dataset's fingerprint, so that
``LanguageModelSAERunnerConfig(use_cached_activations=True, cached_activations_path=OUT, ...)`` trains from it
as is. ``hf`` writes one row per token: ``activations`` (``Sequence(Value(dtype), length=d)``), ``token_id``
(int32), ``sequence`` (int64: the sequence's index in the source set) and ``position`` (int32: within it).
An example set (``--packing none``) exports with ``hf`` only, one row per stored row: ``activations``,
``example`` (int64: the example's row in ``load_examples``), ``example_index`` (int64: its row in the dataset),
``token_id`` and ``position`` (within the example; not for ``--positions mean``) and each kept column (int64,
float64, bool or string), the example's value on each of its rows.

Both stream shard by shard (memory: one shard plus one arrow piece of at most ~256 MB), into ``OUT.partial``
renamed to ``OUT`` at the end: OUT exists only once complete. Arrow has no bfloat16: a bfloat16 set is
exported as float32 (lossless). ``actcache.json`` beside the data says which set it came from.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actcache.errors import ActcacheError, opt
from actcache.read import example_rows
from actcache.read.exclude import token_ids
from actcache.read.reader import Shard, open_set
from actcache.storage.store import StoreRef

FORMATS = ("saelens", "hf")
_PIECE_BYTES = 256 << 20
_EXPORT_DTYPES = {"float16": "float16", "float32": "float32", "bfloat16": "float32"}


@dataclass(frozen=True)
class ExportResult:
    path: str
    rows: int
    """Rows of the dataset: sequences for saelens, tokens for hf."""
    excluded_tokens: int
    dtype: str


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """``datasets``' own progress bars off (each ``save_to_disk`` of a piece would print one), then as they were."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was:
            enable_progress_bars()


def _features(fmt: str, hook: str, ctx: int, d: int, dtype: str, examples: dict[str, Any] | None = None):
    from datasets import Array2D, Features, Sequence, Value

    if examples is not None:  # one row per stored row of an example set
        per_token = examples["positions"] != "mean"
        cols = {"activations": Sequence(Value(dtype), length=d), "example": Value("int64")}
        cols["example_index"] = Value("int64")
        if per_token:
            cols.update(token_id=Value("int32"), position=Value("int32"))
        kinds = {"int": "int64", "float": "float64", "bool": "bool", "str": "string"}
        cols.update({name: Value(kinds[kind]) for name, kind in examples["columns"].items()})
        return Features(cols)

    if fmt == "saelens":  # exactly CacheActivationsRunner's features
        return Features(
            {hook: Array2D(shape=(ctx, d), dtype=dtype), "token_ids": Sequence(Value(dtype="int32"), length=ctx)}
        )
    return Features(
        {
            "activations": Sequence(Value(dtype), length=d),
            "token_id": Value("int32"),
            "sequence": Value("int64"),
            "position": Value("int32"),
        }
    )


def _pieces(
    fmt: str, t: Shard, ctx: int, np_dtype: np.dtype, exclude: tuple[int, ...], first_position: int
) -> tuple[list[dict[str, np.ndarray]], int]:
    """One shard as column dicts of at most ~256 MB each, and the number of tokens excluded."""
    acts, toks = t.activations, t.tokens
    if fmt == "saelens":
        rows = (
            acts.to(torch.float32).numpy().astype(np_dtype, copy=False)
            if acts.dtype == torch.bfloat16
            else acts.numpy()
        )
        cols = {"acts": rows, "token_ids": toks.numpy()}
        excluded = 0
    else:
        d = acts.shape[-1]
        flat_a, flat_t = acts.reshape(-1, d), toks.reshape(-1)
        positions = t.positions if t.positions is not None else first_position + torch.arange(len(flat_t))
        keep = ~torch.isin(flat_t, torch.tensor(exclude, dtype=torch.int32)) if exclude else None
        if keep is not None:
            flat_a, flat_t, positions = flat_a[keep], flat_t[keep], positions[keep]
        excluded = toks.numel() - len(flat_t)
        a = (
            flat_a.to(torch.float32).numpy().astype(np_dtype, copy=False)
            if flat_a.dtype == torch.bfloat16
            else flat_a.numpy()
        )
        cols = {
            "acts": a,
            "token_id": flat_t.numpy(),
            "sequence": (positions // ctx).numpy(),
            "position": (positions % ctx).to(torch.int32).numpy(),
        }
    n = len(cols["acts"])
    row_bytes = max(1, cols["acts"][:1].nbytes)
    per = max(1, _PIECE_BYTES // row_bytes)
    return [{k: v[i : i + per] for k, v in cols.items()} for i in range(0, n, per)], excluded


def _dataset(fmt: str, cols: dict[str, np.ndarray], features, hook: str):
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    if fmt == "saelens":  # the same conversion CacheActivationsRunner's Dataset.from_dict runs
        return Dataset.from_dict({hook: cols["acts"], "token_ids": cols["token_ids"]}, features=features)
    # One row per token: build the fixed-size lists in Arrow directly (from_dict walks them in Python).
    a = cols["acts"]
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])
    table = pa.Table.from_arrays(
        [vectors, pa.array(cols["token_id"]), pa.array(cols["sequence"]), pa.array(cols["position"])],
        schema=features.arrow_schema,
    )
    return Dataset(InMemoryTable(table))


def _example_pieces(
    t: example_rows.ExampleRows, ctx: int, np_dtype: np.dtype, exclude: tuple[int, ...]
) -> tuple[list[dict[str, Any]], int]:
    """One example shard as column dicts of at most ~256 MB each, and the number of rows excluded."""
    keep = ~torch.isin(t.tokens, torch.tensor(exclude, dtype=torch.int32)) if exclude and t.tokens is not None else None
    acts = t.acts if keep is None else t.acts[keep]

    def kept(x: torch.Tensor) -> np.ndarray:
        return (x if keep is None else x[keep]).numpy()

    cols: dict[str, Any] = {
        "acts": acts.to(torch.float32).numpy().astype(np_dtype, copy=False)
        if acts.dtype == torch.bfloat16
        else acts.numpy(),
        "example": kept(t.example),
        "example_index": kept(t.example_index),
    }
    if t.tokens is not None and t.positions is not None:
        cols["token_id"], cols["position"] = kept(t.tokens), kept((t.positions % ctx).to(torch.int32))
    for name, values in t.columns.items():
        if name in t.strings:  # codes: the example within the shard in the low bits
            mask = (1 << example_rows.STRING_BITS) - 1
            cols[name] = [t.strings[name][c & mask] for c in kept(values).tolist()]
        else:
            cols[name] = kept(values)
    n = len(acts)
    per = max(1, _PIECE_BYTES // max(1, cols["acts"][:1].nbytes))
    return [{k: v[i : i + per] for k, v in cols.items()} for i in range(0, n, per)], len(t.acts) - n


def _example_dataset(cols: dict[str, Any], features):
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    a = cols["acts"]
    arrays = [pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])]
    arrays += [pa.array(cols[name]) for name in list(features)[1:]]
    return Dataset(InMemoryTable(pa.Table.from_arrays(arrays, schema=features.arrow_schema)))


def _consolidate(pieces_dir: Path, out: Path) -> None:
    """Flatten one-file datasets into one folder, as SAELens's ``_consolidate_shards`` does."""
    from datasets import Dataset
    from datasets.fingerprint import generate_fingerprint

    dirs = sorted(p for p in pieces_dir.iterdir() if p.name.startswith("shard_"))
    shutil.move(str(dirs[0] / "dataset_info.json"), str(out / "dataset_info.json"))
    files: list[dict[str, str]] = []
    for d in dirs:
        for f in json.loads((d / "state.json").read_text())["_data_files"]:
            name = f"data-{len(files):05d}-of-{len(dirs):05d}.arrow"
            shutil.move(str(d / f["filename"]), str(out / name))
            files.append({"filename": name})
    state: dict[str, Any] = {
        "_data_files": files,
        "_fingerprint": None,
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (out / "state.json").write_text(json.dumps(state, indent=2))
    state["_fingerprint"] = generate_fingerprint(Dataset.load_from_disk(str(out)))
    (out / "state.json").write_text(json.dumps(state, indent=2))
    shutil.rmtree(pieces_dir)


def export_set(
    src: str | StoreRef,
    out: str,
    *,
    format: str,
    exclude_special: bool = False,
    exclude_ids: Any = (),
    on_shard: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> ExportResult:
    """Write the set at ``src`` (its URL, or its ``StoreRef`` where the store needs options or a credentials
    block) as a ``datasets`` folder at ``out`` (a new local path) in ``format``."""
    if format not in FORMATS:
        raise ActcacheError(f"unknown {opt('format')} {format!r}; use one of {', '.join(FORMATS)}")
    target = Path(out)
    if target.exists():
        raise ActcacheError(f"{out} already exists; export into a new folder (or delete it first)")
    if not target.parent.is_dir():
        raise ActcacheError(f"{target.parent} is not a directory; create it or export elsewhere")
    s = open_set(src)
    m = s.manifest
    exclude = token_ids(m, special=exclude_special, ids=exclude_ids)
    if example_rows.is_examples(s):
        if format != "hf":
            raise ActcacheError(
                f"{s.url} holds one row per example (--packing none), not the sequences SAELens reads; "
                f"export it with {opt('format', 'hf')}"
            )
        example_rows.check_reader(s, with_tokens=False, with_positions=False, exclude=bool(exclude))
        own = {"activations", "example", "example_index", "token_id", "position"}
        taken = sorted(set(m["examples"]["columns"]) & own)
        if taken:
            raise ActcacheError(
                f"{s.url} keeps a column named {taken[0]!r}, which the export uses for its own; "
                "read the set with actcache.load_examples instead"
            )
    rows_layout = s.layout == "rows"
    if format == "saelens" and rows_layout:
        raise ActcacheError(
            f"{s.url} is a shuffled (rows) set: SAELens reads whole sequences; export its source "
            f"({m['source']['set_id']}) with {opt('format', 'saelens')}, or this set with "
            f"{opt('format', 'hf')}"
        )
    if format == "saelens" and exclude:
        raise ActcacheError(
            f"{opt('format', 'saelens')} keeps whole sequences (Array2D(context_size, d) per row), "
            "so rows cannot be left out here; SAELens leaves them out itself from the exported "
            "token_ids: set exclude_special_tokens=True (or a list of ids) in its "
            "LanguageModelSAERunnerConfig"
        )
    ctx = m["tokenization"]["context_size"] if rows_layout else m["key"]["tokens"]["context_size"]
    dtype = _EXPORT_DTYPES[m["dtype"]]
    examples = m.get("examples")
    features = _features(format, m["hook"], ctx, m["d"], dtype, examples)
    full_tokens = 0 if rows_layout else m["key"]["tokens"]["seqs_per_shard"] * ctx

    partial = target.with_name(target.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # what an interrupted export of the same OUT left
    pieces_dir = partial / ".tmp_shards"
    pieces_dir.mkdir(parents=True)
    from datasets import Dataset

    with _quiet_datasets():  # a bar per piece saved would bury the export's own
        n_pieces = rows = excluded = 0
        if on_total:
            on_total(len(s.records))
        firsts = example_rows.first_examples(s) if examples else []
        for r in s.records:
            if examples:
                chunks, dropped = _example_pieces(
                    example_rows.read(s, r, firsts[r.index], verify=True), ctx, np.dtype(dtype), exclude
                )
            else:
                shard = s.read(r, verify=True)
                chunks, dropped = _pieces(format, shard, ctx, np.dtype(dtype), exclude, r.index * full_tokens)
            excluded += dropped
            for cols in chunks:
                ds = _example_dataset(cols, features) if examples else _dataset(format, cols, features, m["hook"])
                ds.save_to_disk(str(pieces_dir / f"shard_{n_pieces:05d}"), num_shards=1)
                n_pieces += 1
                rows += len(cols["acts"])
            if on_shard:
                on_shard(r.index)
        if not n_pieces and examples:
            Dataset.from_dict({k: [] for k in features}, features=features).save_to_disk(
                str(pieces_dir / "shard_00000"), num_shards=1
            )
        elif not n_pieces:  # nothing left: still a loadable, empty dataset
            empty = {
                "acts": np.zeros((0, ctx, m["d"]) if format == "saelens" else (0, m["d"]), dtype=dtype),
                "token_ids": np.zeros((0, ctx), np.int32),
                "token_id": np.zeros(0, np.int32),
                "sequence": np.zeros(0, np.int64),
                "position": np.zeros(0, np.int32),
            }
            _dataset(format, empty, features, m["hook"]).save_to_disk(str(pieces_dir / "shard_00000"), num_shards=1)
        _consolidate(pieces_dir, partial)
    provenance = {k: v for k, v in m.items() if k not in ("shards", "moments")}
    (partial / "actcache.json").write_text(
        json.dumps(
            {
                "format": format,
                "set_id": s.set_id,
                "excluded": {"ids": list(exclude), "tokens": excluded},
                "dtype": dtype,
                "manifest": provenance,
            },
            indent=1,
            sort_keys=True,
        )
        + "\n"
    )
    os.replace(partial, target)
    return ExportResult(str(target), rows, excluded, dtype)
