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
import re
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
from actcache.storage import secrets
from actcache.storage.local import layout_folder_holding
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


def _features(
    fmt: str, hooks: list[str], ctx: int, ds: list[int], dtypes: list[str], examples: dict[str, Any] | None = None
):
    """Columns: SAELens's (one ``Array2D`` per hook, and ``token_ids``), one row per stored row of an example set,
    or one row per token (``activations`` for one set; one column per hook for several)."""
    from datasets import Array2D, Features, Sequence, Value

    if examples is not None:  # one row per stored row of an example set (one set: refused with several)
        per_token = examples["positions"] != "mean"
        cols = {"activations": Sequence(Value(dtypes[0]), length=ds[0]), "example": Value("int64")}
        cols["example_index"] = Value("int64")
        if per_token:
            cols.update(token_id=Value("int32"), position=Value("int32"))
        kinds = {"int": "int64", "float": "float64", "bool": "bool", "str": "string"}
        cols.update({name: Value(kinds[kind]) for name, kind in examples["columns"].items()})
        return Features(cols)

    names = _act_columns(fmt, hooks)
    if fmt == "saelens":  # exactly CacheActivationsRunner's features (it caches one column per hook)
        cols = {n: Array2D(shape=(ctx, d), dtype=dt) for n, d, dt in zip(names, ds, dtypes, strict=True)}
        return Features({**cols, "token_ids": Sequence(Value(dtype="int32"), length=ctx)})
    return Features(
        {
            **{n: Sequence(Value(dt), length=d) for n, d, dt in zip(names, ds, dtypes, strict=True)},
            "token_id": Value("int32"),
            "sequence": Value("int64"),
            "position": Value("int32"),
        }
    )


def _act_columns(fmt: str, hooks: list[str]) -> list[str]:
    """The activation columns' names: the hooks', except ``activations`` for one set in ``hf``. A hook given by
    several sets (two models' same hook, for a crosscoder) is named with each set's place: ``HOOK#0``, ``HOOK#1``
    (``actcache.json`` says which set and model each column came from)."""
    if fmt == "hf" and len(hooks) == 1:
        return ["activations"]
    repeated = {h for h in hooks if hooks.count(h) > 1}
    return [f"{h}#{k}" if h in repeated else h for k, h in enumerate(hooks)]


def _numpy(acts: torch.Tensor, np_dtype: np.dtype) -> np.ndarray:
    return acts.to(torch.float32).numpy().astype(np_dtype, copy=False) if acts.dtype == torch.bfloat16 else acts.numpy()


def _pieces(
    fmt: str,
    shards: list[Shard],
    ctx: int,
    np_dtypes: list[np.dtype],
    exclude: tuple[int, ...],
    first_position: int,
) -> tuple[list[dict[str, Any]], int]:
    """One shard (of each set: the same tokens) as column dicts of at most ~256 MB each, and the number of
    tokens excluded. ``acts`` holds one array per set."""
    t = shards[0]
    toks = t.tokens
    if fmt == "saelens":
        cols: dict[str, Any] = {"token_ids": toks.numpy()}
        acts = [_numpy(x.activations, dt) for x, dt in zip(shards, np_dtypes, strict=True)]
        excluded = 0
    else:
        flat_t = toks.reshape(-1)
        flat = [x.activations.reshape(-1, x.activations.shape[-1]) for x in shards]
        positions = t.positions if t.positions is not None else first_position + torch.arange(len(flat_t))
        keep = ~torch.isin(flat_t, torch.tensor(exclude, dtype=torch.int32)) if exclude else None
        if keep is not None:
            flat, flat_t, positions = [a[keep] for a in flat], flat_t[keep], positions[keep]
        excluded = toks.numel() - len(flat_t)
        acts = [_numpy(a, dt) for a, dt in zip(flat, np_dtypes, strict=True)]
        cols = {
            "token_id": flat_t.numpy(),
            "sequence": (positions // ctx).numpy(),
            "position": (positions % ctx).to(torch.int32).numpy(),
        }
    n = len(acts[0])
    row_bytes = max(1, sum(a[:1].nbytes for a in acts))
    per = max(1, _PIECE_BYTES // row_bytes)
    return [
        {"acts": [a[i : i + per] for a in acts], **{k: v[i : i + per] for k, v in cols.items()}}
        for i in range(0, n, per)
    ], excluded


def _dataset(fmt: str, cols: dict[str, Any], features, hooks: list[str]):
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    if fmt == "saelens":  # the same conversion CacheActivationsRunner's Dataset.from_dict runs
        data = dict(zip(_act_columns(fmt, hooks), cols["acts"], strict=True))
        return Dataset.from_dict({**data, "token_ids": cols["token_ids"]}, features=features)
    # One row per token: build the fixed-size lists in Arrow directly (from_dict walks them in Python).
    vectors = [pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1]) for a in cols["acts"]]
    table = pa.Table.from_arrays(
        [*vectors, pa.array(cols["token_id"]), pa.array(cols["sequence"]), pa.array(cols["position"])],
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


MARK = ".actcache-export"
"""An empty file in an export's folder from its start until ``actcache.json`` is written: only a folder holding
one of them is an unfinished export that a new one may delete."""


@contextlib.contextmanager
def _unfinished(target: Path) -> Iterator[Path]:
    """``OUT.partial``, new and marked as actcache's, for the export to fill and rename to OUT; removed if the export
    fails or is interrupted. One a killed export left is deleted first, one that is not actcache's refused."""
    partial = target.with_name(target.name + ".partial")
    ours = (partial / MARK).is_file() or (partial / "actcache.json").is_file()
    if partial.is_symlink() or (partial.exists() and not ours):
        raise ActcacheError(
            f"{partial} exists and is not an unfinished export of actcache's; move it away or export elsewhere"
        )
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    (partial / MARK).touch()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


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


def _within(path: Path, folder: str) -> bool:
    """Whether ``path`` (which need not exist) lies in local ``folder``, through links and ``..``."""
    inner = os.path.realpath(path)
    outer = os.path.realpath(folder.removeprefix("file://"))
    return (inner.rstrip("/") + "/").startswith(outer.rstrip("/") + "/")


def export_set(
    src: str | StoreRef | list[str | StoreRef],
    out: str,
    *,
    format: str,
    exclude_special: bool = False,
    exclude_ids: Any = (),
    on_shard: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> ExportResult:
    """Write the set at ``src`` (its URL, or its ``StoreRef`` where the store needs options or a credentials
    block) as a ``datasets`` folder at ``out`` (a new local path) in ``format``. A list of sets extracted from
    the same tokens (``--hook a,b``) goes into one folder, row-aligned: one activation column per hook."""
    from actcache.read.dataset import check_aligned

    secrets.check_value(out, "the export folder (OUT)")  # it is printed, and names a folder: no credential in it
    if format not in FORMATS:
        raise ActcacheError(f"unknown {opt('format')} {format!r}; use one of {', '.join(FORMATS)}")
    if (scheme := re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", out)) is not None:
        # As a path, "s3://b/x" would be the local folder "s3:/b/x": never write there.
        raise ActcacheError(
            f"export writes a local folder, and OUT {out!r} is a {scheme[1]} URL: export to a local folder, then "
            f"upload it (datasets.load_from_disk reads it back from there with storage_options)"
        )
    try:
        os.fsencode(out).decode("utf-8")
    except UnicodeDecodeError:  # pyarrow, which writes and maps the folder's files, takes UTF-8 paths only
        raise ActcacheError(
            f"{out!r} is not a UTF-8 path, which the Arrow files of an export need; export elsewhere"
        ) from None
    target = Path(out)
    if target.is_symlink():  # even a dangling one: the export would land where it points
        raise ActcacheError(f"{out} is a symlink; export into a new folder (or delete the link first)")
    if target.exists():
        raise ActcacheError(f"{out} already exists; export into a new folder (or delete it first)")
    if not target.parent.is_dir():
        raise ActcacheError(f"{target.parent} is not a directory; create it or export elsewhere")
    if (held := layout_folder_holding(out)) is not None:
        raise ActcacheError(
            f"{out} lies inside {held!r}, a folder of a store's own layout (a set, _tokens or _content); "
            "export elsewhere"
        )
    sets = [open_set(u) for u in (src if isinstance(src, list) else [src])]
    for x in sets:  # as cp and shuffle refuse their destinations: a folder nested in a set is not the set's
        if x.store.local and _within(target, x.url):
            raise ActcacheError(f"{out} is inside the set {x.url}; export into a folder outside it")
    s = sets[0]
    m = s.manifest
    if len(sets) > 1 and any(example_rows.is_examples(x) for x in sets):
        raise ActcacheError(
            "sets with one row per example (--packing none) export one at a time; export each set on its own"
        )
    hooks = [x.manifest["hook"] for x in sets]
    check_aligned(sets)  # refused in one line unless they hold the same tokens in the same shards
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
    dtypes = [_EXPORT_DTYPES[x.manifest["dtype"]] for x in sets]
    examples = m.get("examples")
    features = _features(format, hooks, ctx, [x.manifest["d"] for x in sets], dtypes, examples)
    full_tokens = 0 if rows_layout else m["key"]["tokens"]["seqs_per_shard"] * ctx

    with _unfinished(target) as partial:
        pieces_dir = partial / ".tmp_shards"
        pieces_dir.mkdir()
        from datasets import Dataset

        with _quiet_datasets():  # a bar per piece saved would bury the export's own
            n_pieces = rows = excluded = 0
            if on_total:
                on_total(len(s.records))
            firsts = example_rows.first_examples(s) if examples else []
            for i, r in enumerate(s.records):
                if examples:
                    chunks, dropped = _example_pieces(
                        example_rows.read(s, r, firsts[r.index], verify=True), ctx, np.dtype(dtypes[0]), exclude
                    )
                else:
                    shards = [x.read(x.records[i], verify=True) for x in sets]
                    for x, other in zip(sets[1:], shards[1:], strict=True):
                        if not torch.equal(other.tokens, shards[0].tokens):
                            raise ActcacheError(
                                f"shard {r.index} of {x.url} holds other tokens than that of {s.url}; export together "
                                "only sets extracted from the same tokens"
                            )
                    chunks, dropped = _pieces(
                        format, shards, ctx, [np.dtype(dt) for dt in dtypes], exclude, r.index * full_tokens
                    )
                excluded += dropped
                for cols in chunks:
                    ds = _example_dataset(cols, features) if examples else _dataset(format, cols, features, hooks)
                    ds.save_to_disk(str(pieces_dir / f"shard_{n_pieces:05d}"), num_shards=1)
                    n_pieces += 1
                    rows += len(cols["acts"]) if examples else len(cols["acts"][0])
                if on_shard:
                    on_shard(r.index)
            if not n_pieces and examples:
                Dataset.from_dict({k: [] for k in features}, features=features).save_to_disk(
                    str(pieces_dir / "shard_00000"), num_shards=1
                )
            elif not n_pieces:  # nothing left: still a loadable, empty dataset
                acts = [
                    np.zeros((0, ctx, x.manifest["d"]) if format == "saelens" else (0, x.manifest["d"]), dtype=dt)
                    for x, dt in zip(sets, dtypes, strict=True)
                ]
                empty = {
                    "acts": acts,
                    "token_ids": np.zeros((0, ctx), np.int32),
                    "token_id": np.zeros(0, np.int32),
                    "sequence": np.zeros(0, np.int64),
                    "position": np.zeros(0, np.int32),
                }
                _dataset(format, empty, features, hooks).save_to_disk(str(pieces_dir / "shard_00000"), num_shards=1)
            _consolidate(pieces_dir, partial)
        meta: dict[str, Any] = {
            "format": format,
            "set_id": s.set_id,
            "excluded": {"ids": list(exclude), "tokens": excluded},
            "dtype": dtypes[0],
            "manifest": {k: v for k, v in m.items() if k not in ("shards", "moments")},
        }
        if len(sets) > 1:  # which column came from which set
            meta["sets"] = [
                {
                    "column": c,
                    "set_id": x.set_id,
                    "hook": h,
                    "model": (x.manifest.get("model") or {}).get("name"),
                    "dtype": dt,
                }
                for c, x, h, dt in zip(_act_columns(format, hooks), sets, hooks, dtypes, strict=True)
            ]
        (partial / "actcache.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        (partial / MARK).unlink()  # OUT holds what its format's readers expect; actcache.json now marks it ours
        os.replace(partial, target)
        return ExportResult(str(target), rows, excluded, dtypes[0])
