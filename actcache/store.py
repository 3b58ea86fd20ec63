"""One storage layer over fsspec: the same code writes to a local folder, s3://, gs://, memory://.

Writes are all-or-nothing: a local file is written under a temp name, fsynced and renamed; on object
stores a single PUT (or a completed multipart upload) is what makes an object exist at all.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from actcache.errors import ActcacheError


@dataclass(frozen=True)
class Entry:
    size: int
    mtime: float
    """Seconds since the epoch (local mtime, or the object's LastModified)."""


def _mtime(info: dict) -> float:
    for k in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(k)
        if v is None:
            continue
        if hasattr(v, "timestamp"):
            return v.timestamp()
        if isinstance(v, (int, float)):
            return float(v)
    return 0.0


class Store:
    """A root URL plus relative paths."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url.rstrip("/") or url
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        except (ImportError, ValueError) as e:
            raise ActcacheError(f"cannot open store {url!r}: {e}") from None
        self.root = self.root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, rel: str = "") -> str:
        return f"{self.url}/{rel}" if rel else self.url

    # -- reading -------------------------------------------------------------------------------
    def listing(self, rel: str) -> dict[str, Entry]:
        """Every file below ``rel`` in one listing, as {path relative to rel: Entry}."""
        base = self.path(rel)
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for p, info in found.items():
            if info.get("type", "file") != "file":
                continue
            rp = p[len(base) :].lstrip("/") if p.startswith(base) else p
            out[rp] = Entry(int(info.get("size") or 0), _mtime(info))
        return out

    def list_dirs(self, rel: str = "") -> list[str]:
        try:
            entries = self.fs.ls(self.path(rel), detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    # -- writing -------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` so that the file either exists in full or not at all."""
        path = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        else:
            self.fs.pipe_file(path, data)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())

    def check_writable(self) -> None:
        """Fail early, writing nothing, if the store cannot hold a set."""
        if not self.local:
            return  # object stores answer on the first write; credentials are checked there
        p = self.root
        if os.path.isfile(p):
            raise ActcacheError(f"store {self.url!r} is a file; pass a directory (or a new path) as --store")
        while not os.path.exists(p):
            parent = os.path.dirname(p)
            if parent == p:
                break
            p = parent
        if os.path.isfile(p):
            raise ActcacheError(f"store {self.url!r} is inside the file {p!r}; pass a directory as --store")
        if not os.access(p, os.W_OK | os.X_OK):
            raise ActcacheError(f"store {self.url!r} is not writable ({p!r} denies writes); choose another --store")
