"""Text sources: an HF dataset by name, or local/fsspec files (.txt, .jsonl, .json, .parquet, globs).

``open_source`` validates (exists, not empty, has the text column) and fingerprints before anything is
written; ``Source.texts()`` then streams documents in a fixed order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from actcache.errors import ActcacheError, opt
from actcache.inputs import fingerprint, hub
from actcache.storage.store import fsspec_options

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


def _kind(path: str) -> str | None:
    name = path.lower()
    for c in _COMPRESSED:
        if name.endswith(c):
            name = name[: -len(c)]
    for s in SUFFIXES:
        if name.endswith(s):
            return s[1:]
    return None


def looks_like_files(path: str) -> bool:
    return (
        "://" in path
        or path.startswith(("/", ".", "~"))
        or any(c in path for c in "*?[")
        or _kind(path) is not None
        or os.path.exists(path)
    )


@dataclass(frozen=True)
class DatasetSpec:
    """Where the text comes from (what the user typed, before resolution)."""

    path: str
    name: str | None = None
    split: str = "train"
    revision: str | None = None
    streaming: bool = True
    text_column: str = "text"
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Source:
    """A dataset resolved and pinned: a hub dataset at its commit sha, or files with their content fingerprint.

    Small and picklable (a plan carries it): ``texts()`` reads exactly what was fingerprinted, without
    resolving the name again.
    """

    spec: DatasetSpec
    """What to read; for a hub dataset, ``revision`` is the commit sha it was resolved to."""
    fingerprint: str
    files: tuple[str, ...] | None
    """The files in reading order (None for a hub dataset)."""
    label: str
    """What the user called the dataset (recorded in manifests instead of resolved local paths)."""

    def check(self) -> None:
        """Fail, in one line, unless there is text to read: an empty dataset, a missing text column.

        Separate from resolution: a plan whose token shards are all stored never reads the text, so a
        complete set is recognised even while the hub is unreachable.
        """
        for _ in self.texts():
            return
        if self.files is None:
            raise ActcacheError(f"dataset {self.label!r} split {self.spec.split!r} is empty")
        raise ActcacheError(f"dataset {self.label!r} is empty: no non-empty text in column {self.spec.text_column!r}")

    def texts(self) -> Iterator[str]:
        if self.files is None:
            yield from _hf_texts(self.spec)
            return
        fs = _fs(self.spec)
        for f in self.files:
            yield from _file_texts(fs, f, self.spec.text_column)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.label, "text_column": self.spec.text_column, "fingerprint": self.fingerprint}
        if self.files is None:
            d.update(config=self.spec.name, split=self.spec.split, revision=self.spec.revision)
        else:
            d["files"] = [os.path.basename(f) for f in self.files]
        return d


def open_source(spec: DatasetSpec, label: str | None = None) -> Source:
    """Find ``spec`` and pin it (one hub request at most for a hub dataset); ``Source.check`` reads its text."""
    if looks_like_files(spec.path):
        return _open_files(spec, label or spec.path)
    return _open_hub(spec, label or spec.path)


def _fs(spec: DatasetSpec) -> Any:
    import fsspec

    return fsspec.core.url_to_fs(os.path.expanduser(spec.path), **fsspec_options(spec.storage_options))[0]


# -- files -------------------------------------------------------------------------------------
def _open_files(spec: DatasetSpec, label: str) -> Source:
    import fsspec

    path = os.path.expanduser(spec.path)
    try:
        fs, root = fsspec.core.url_to_fs(path, **fsspec_options(spec.storage_options))
    except (ImportError, ValueError, TypeError) as e:
        raise ActcacheError(f"cannot open dataset {spec.path!r} ({e})") from e
    try:
        # A path that exists is that file or folder, even with glob characters in its name ("[draft] notes.txt").
        if any(c in root for c in "*?[") and not fs.exists(root):
            files = sorted(p for p in fs.glob(root) if fs.isfile(p))
        elif fs.isdir(root):
            files = sorted(p for p in fs.find(root) if _kind(p))
        elif fs.isfile(root):
            files = [root]
        else:
            files = []
    except (FileNotFoundError, PermissionError):
        files = []
    if not files:
        raise ActcacheError(
            f"dataset {spec.path!r} not found (no such file, folder or glob match); "
            f"pass an existing {'/'.join(SUFFIXES)} path or an HF dataset name"
        )
    unknown = [f for f in files if _kind(f) is None]
    if unknown:
        raise ActcacheError(
            f"dataset file {unknown[0]!r} has an unsupported type; use one of "
            f"{', '.join(SUFFIXES)} (optionally compressed)"
        )
    local = fs.protocol in ("file", "local") or "file" in fs.protocol
    for f in files if local else ():
        try:
            regular = stat.S_ISREG(os.stat(f).st_mode)  # through links (an HF cache links to its blobs)
        except OSError:
            regular = False
        if not regular:  # a device or FIFO would be read (and hashed) without end
            raise ActcacheError(
                f"dataset file {f!r} is not a regular file (a device, FIFO, socket or broken link); remove it from "
                "the folder, or pass the files you mean"
            )
    parts = {}
    for i, f in enumerate(files):
        stamp = fingerprint.file_sha256(f) if local else f"{fs.ukey(f)}:{fs.size(f)}"
        parts[f"{i:06d}.{_kind(f)}"] = stamp
    return Source(spec, "files:" + fingerprint.combine(parts), tuple(files), label)


def _columns_error(path: str, column: str, columns) -> ActcacheError:
    return ActcacheError(
        f"text column {column!r} not in {os.path.basename(path)!r}; "
        f"its columns are {sorted(columns)}: pass one as {opt('text_column')}"
    )


def _file_texts(fs, path: str, column: str) -> Iterator[str]:
    """The non-empty texts of one file, in order; anything that is not text fails naming the file and line.

    null and "" are skipped (missing texts); a number, list or object in the text column is an error, and so is
    a byte sequence that is not UTF-8 or a file that is not what its name says (a fake .gz, corrupt parquet).
    """
    name = os.path.basename(path)
    try:
        yield from _file_values(fs, path, column, name)
    except ActcacheError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ActcacheError(
            f"dataset file {name!r} cannot be read as {_kind(path)} ({type(e).__name__}: {first}); fix or remove it"
        ) from e


def _text(value: Any, label: str, where: str, column: str) -> str | None:
    """``value`` as a document: None for null or "" (skipped), an error for anything that is not a string."""
    if value is None or isinstance(value, str):
        return value or None
    raise ActcacheError(
        f"{label} {where}: column {column!r} holds {type(value).__name__} {str(value)[:40]!r}, "
        f"not text; fix the data or pick another {opt('text_column')}"
    )


NEWLINE = b"\n"


def _utf8(raw: bytes, name: str, where: str | None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where = where or f"line {raw.count(NEWLINE, 0, e.start) + 1}"
        raise ActcacheError(
            f"dataset file {name!r} {where} is not UTF-8 text ({e.reason} at byte {e.start}); convert the file to UTF-8"
        ) from e


def _file_values(fs, path: str, column: str, name: str) -> Iterator[str]:
    kind = _kind(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            if column not in pf.schema_arrow.names:
                raise _columns_error(path, column, pf.schema_arrow.names)
            row = 0
            for batch in pf.iter_batches(columns=[column], batch_size=1024):
                for t in batch.column(0).to_pylist():
                    row += 1
                    t = _text(t, f"dataset file {name!r}", f"row {row}", column)
                    if t:
                        yield t
        return
    with fs.open(path, "rb", compression="infer") as fh:
        if kind == "txt":
            if column != "text":
                raise _columns_error(path, column, ["text"])
            for n, raw in enumerate(fh, 1):
                line = _utf8(raw, name, f"line {n}").rstrip("\r\n")
                if line.strip():
                    yield line
            return
        rows: Iterable[tuple[int, Any]]
        if kind == "jsonl":
            rows = (
                (n, _json(_utf8(raw, name, f"line {n}"), name, f"line {n}"))
                for n, raw in enumerate(fh, 1)
                if raw.strip()
            )
        else:
            data = _json(_utf8(fh.read(), name, None), name, "")
            if isinstance(data, dict):
                lists = [v for v in data.values() if isinstance(v, list)]
                data = lists[0] if len(lists) == 1 else [data]
            if not isinstance(data, list):
                raise ActcacheError(
                    f"dataset file {name!r} holds a JSON {type(data).__name__}; it must be a list of "
                    f"objects with a {column!r} field"
                )
            rows = enumerate(data, 1)
        for n, row in rows:
            where = f"line {n}" if kind == "jsonl" else f"item {n}"
            if not isinstance(row, dict):
                raise ActcacheError(
                    f"dataset file {name!r} {where}: rows must be JSON objects with a "
                    f"{column!r} field, got {type(row).__name__}"
                )
            if column not in row:
                raise _columns_error(path, column, row)
            t = _text(row[column], f"dataset file {name!r}", where, column)
            if t:
                yield t


def _json(text: str, name: str, where: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise ActcacheError(f"dataset file {name!r} {where}: JSON nested too deeply") from None
    except json.JSONDecodeError as e:
        at = where or f"line {e.lineno}"
        raise ActcacheError(f"dataset file {name!r} {at}: not valid JSON ({e.msg}); fix the file") from e


# -- HF hub --------------------------------------------------------------------------------------
def _open_hub(spec: DatasetSpec, label: str) -> Source:
    sha, err = hub.commit(spec.path, spec.revision, "dataset")
    if sha is None:
        raise ActcacheError(
            f"dataset {spec.path!r} not found locally nor on the HF hub: {hub.why(err)}; pass an "
            "existing file path, or an HF dataset name with network access",
            field="dataset",
        )
    parts = {"hf": spec.path, "config": spec.name, "split": spec.split, "revision": sha}
    spec = dataclasses.replace(spec, revision=sha)  # pinned: every later read sees this commit, not the branch's
    return Source(spec, "hf:" + fingerprint.combine(parts), None, label)


def _hf_texts(spec: DatasetSpec) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(
            spec.path, spec.name, split=spec.split, revision=spec.revision, streaming=spec.streaming
        )
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ActcacheError(
            f"cannot load HF dataset {spec.path!r} ({first[:200]}); check {opt('dataset')}, "
            f"{opt('dataset_config')} and {opt('split')}"
        ) from e
    cols = ds.column_names or list(getattr(ds, "features", None) or [])
    if cols and spec.text_column not in cols:
        raise _columns_error(spec.path, spec.text_column, cols)
    try:
        for n, row in enumerate(ds, 1):
            t = _text(row[spec.text_column], f"HF dataset {spec.path!r}", f"row {n}", spec.text_column)
            if t:
                yield t
    except ActcacheError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ActcacheError(
            f"cannot read HF dataset {spec.path!r} ({type(e).__name__}: {first}); check "
            f"{opt('dataset')}, {opt('dataset_config')} and {opt('split')}"
        ) from e
