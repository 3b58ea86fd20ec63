"""One storage layer over fsspec: the same code writes to a local folder, s3://, gs://, memory://.

Writes are all-or-nothing: a local file is written under a temp name, fsynced and renamed; on object
stores a single PUT (or a completed multipart upload) is what makes an object exist at all.

Storage failures leave here as one-line ``ActcacheError``s (see ``storage_errors``); transient ones as
``StoreUnavailable``, which the upload task retries. S3 endpoints come from ``AWS_ENDPOINT_URL``,
``FSSPEC_S3_ENDPOINT_URL`` or ``endpoint_url`` in the storage options; credentials from the AWS chain or
a Prefect ``AwsCredentials`` block named by ``credentials_block``.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from actcache import faults, storage_errors
from actcache.errors import ActcacheError


@dataclass(frozen=True)
class Entry:
    size: int
    mtime: float
    """Seconds since the epoch (local mtime, or the object's LastModified)."""


_TMP_MARK = ".tmp-"
_HOST = socket.gethostname().replace("-", "_")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


# botocore's legacy retries back off for up to ~15 s per call on a refused connection, and a connect may hang
# for 60 s: AWS's "standard" mode (3 attempts, also for 5xx and throttling) keeps a dead endpoint a ~5 s error.
_S3_CONFIG = {"retries": {"mode": "standard", "max_attempts": 3}, "connect_timeout": 10}


class _Parts:
    """A buffer that s3fs's multipart upload slices into parts (it only takes ``len`` and slices): each part
    becomes bytes only while it is uploaded, so a shard is never copied whole (botocore takes no memoryview)."""

    def __init__(self, view: memoryview):
        self.view = view

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, part: slice) -> bytes:
        return self.view[part].tobytes()


class Store:
    """A root URL plus relative paths."""

    part_size = 16 << 20
    """Multipart part size on S3: objects of at least twice this go up in parts, smaller ones in one PUT."""
    part_concurrency = 4
    """Parts uploaded at once: each is a copy of its slice while it is in flight."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, *,
                 credentials_block: str | None = None):
        self.url = url.rstrip("/") or url
        options = dict(storage_options or {})
        if credentials_block:
            if not self.url.startswith(("s3://", "s3a://")):
                raise ActcacheError(f"--aws-credentials-block applies to s3:// stores, not {self.url!r}; omit it")
            from actcache.credentials import block_options

            options = block_options(credentials_block, options)
        if self.url.startswith(("s3://", "s3a://")):
            options = {**options, "config_kwargs": {**_S3_CONFIG, **options.get("config_kwargs", {})}}
        try:
            fs, self.root = fsspec.core.url_to_fs(self.url, **options)
        except (ImportError, ValueError, TypeError) as e:
            raise ActcacheError(f"cannot open store {url!r}: {e}") from None
        self._options = options  # may hold a block's secrets: never printed, logged or returned
        self._fs, self._pid = fs, os.getpid()
        self.root = self.root.rstrip("/")
        self.local = isinstance(fs, LocalFileSystem)
        self.s3 = "s3" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        # An async filesystem (s3fs) belongs to its creator's event-loop thread: a forked DataLoader worker
        # or a process that unpickled this store makes its own.
        if self._pid != os.getpid() or self._fs is None:
            self._fs = fsspec.core.url_to_fs(self.url, **self._options)[0]
            self._pid = os.getpid()
        return self._fs

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None, "_pid": None}

    @contextmanager
    def _io(self, action: str, rel: str = "") -> Iterator[None]:
        """Turn storage failures (bucket, credentials, endpoint, 5xx) into one-line errors."""
        try:
            yield
        except Exception as e:
            err = storage_errors.translate(e, self.url_of(rel), action)
            if err is None:
                raise
            raise err from None

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
        with self._io("listing", rel):
            self.fs.invalidate_cache(base)  # another process may have written since this one last looked
            try:
                found = self.fs.find(base, detail=True)
            except FileNotFoundError as e:
                if storage_errors.translate(e, self.url_of(rel), "listing") is not None:
                    raise  # a missing bucket, not a missing folder
                return {}
        out = {}
        for p, info in found.items():
            if info.get("type", "file") != "file":
                continue
            rp = p[len(base) :].lstrip("/") if p.startswith(base) else p
            out[rp] = Entry(int(info.get("size") or 0), _mtime(info))
        return out

    def list_dirs(self, rel: str = "") -> list[str]:
        with self._io("listing", rel):
            self.fs.invalidate_cache(self.path(rel))
            try:
                entries = self.fs.ls(self.path(rel), detail=True)
            except FileNotFoundError as e:
                if storage_errors.translate(e, self.url_of(rel), "listing") is not None:
                    raise
                return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")

    def exists(self, rel: str) -> bool:
        with self._io("checking", rel):
            return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        with self._io("reading", rel):
            return self.fs.cat_file(self.path(rel))

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    # -- writing -------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes | memoryview) -> None:
        """Write ``data`` so that the file either exists in full or not at all.

        A memoryview (a shard's buffer) is written where it lies: locally as is, on S3 one part at a time.
        """
        path = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}{_TMP_MARK}{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                faults.point("store.temp-written")
                os.replace(tmp, path)
            except BaseException as e:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                    raise ActcacheError(f"cannot write {self.url_of(rel)} ({e.strerror}); free space or fix "
                                        "permissions, then rerun: finished shards are kept") from None
                raise
        else:
            # One PUT, or a multipart upload that s3fs completes only after every part is in (and aborts
            # on error): a reader never sees a partial object.
            kwargs = {"chunksize": self.part_size, "max_concurrency": self.part_concurrency} if self.s3 else {}
            if isinstance(data, memoryview):
                data = _Parts(data) if self.s3 and len(data) >= 2 * self.part_size else data.tobytes()
            with self._io("writing", rel):
                self.fs.pipe_file(path, data, **kwargs)

    def sweep_temp(self, rel: str) -> int:
        """Delete temp files left below ``rel`` by killed writers of this host; return how many.

        Temp names carry host and pid, so a live writer's file (or another host's) is never touched.
        """
        if not self.local:
            return 0  # object stores have no temp objects: an upload is invisible until complete
        removed = 0
        for dirpath, _, files in os.walk(self.path(rel)):
            for name in files:
                _, mark, tail = name.partition(_TMP_MARK)
                host, _, rest = tail.rpartition("-")[0].rpartition("-") if mark else ("", "", "")
                if not mark or host != _HOST or not rest.isdigit() or _alive(int(rest)):
                    continue
                try:
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
                except FileNotFoundError:
                    pass
        return removed

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())

    def check_writable(self) -> None:
        """Fail early, writing nothing, if the store cannot hold a set."""
        if not self.local:
            self.check_reachable()  # bucket, credentials and endpoint; a denied write fails at once, unretried
            return
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
        try:  # a real probe: os.access says yes to root even where writes fail (read-only mounts, sysfs)
            fd, probe = tempfile.mkstemp(prefix=".actcache-probe-", dir=p)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise ActcacheError(f"store {self.url!r} is not writable ({p!r}: {e.strerror}); "
                                "choose another --store or fix its permissions") from None

    def check_reachable(self) -> None:
        """Fail now, saying what to fix, if the store is missing, unreachable or refuses these credentials."""
        if self.local:
            if not os.path.isdir(self.root):
                raise ActcacheError(f"store {self.url!r} does not exist (no such directory)")
            return
        self.list_dirs()  # one request: NoSuchBucket, InvalidAccessKeyId, AccessDenied, connection refused
