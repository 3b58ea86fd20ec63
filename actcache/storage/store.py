"""One storage layer over fsspec: the same code writes to a local folder, s3://, gs://, memory://.

Writes are all-or-nothing: a local file is written under a temp name, fsynced and renamed; on object
stores a single PUT (or a completed multipart upload) is what makes an object exist at all.

Storage failures leave here as one-line ``ActcacheError``s (see ``storage_errors``); transient ones as
``StoreUnavailable``, which the upload task retries. S3 endpoints come from ``AWS_ENDPOINT_URL``,
``FSSPEC_S3_ENDPOINT_URL`` or ``endpoint_url`` in the storage options; credentials from the AWS chain or
a Prefect ``AwsCredentials`` block named by ``credentials_block``.

A ``StoreRef`` (URL, options, credentials block name) is how a store travels between callers, tasks and
processes; ``StoreRef.open()`` makes the ``Store`` that does the I/O.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import mmap
import os
import stat
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO

import fsspec
import fsspec.asyn
import fsspec.exceptions
from fsspec.implementations.local import LocalFileSystem

from actcache import crashpoints
from actcache.errors import ActcacheError, Failure, opt
from actcache.format import layout
from actcache.storage import failures, housekeeping, secrets
from actcache.storage.housekeeping import _HOST, TempFile, Upload, me
from actcache.storage.local import _prefault, layout_folder_holding
from actcache.storage.s3 import (
    _S3_CONFIG,
    DEADLINE_RATE,
    DEADLINE_S,
    S3_ATTEMPTS,
    S3_CONNECT_TIMEOUT,
    S3_READ_TIMEOUT,
    S3FS_RETRIES,
    _bound_retries,
    _Parts,
)

# Re-exported: they were defined here before the S3 pieces and housekeeping listings had modules of their own.
__all__ = [
    "S3_ATTEMPTS",
    "S3_CONNECT_TIMEOUT",
    "S3_READ_TIMEOUT",
    "S3FS_RETRIES",
    "Entry",
    "Store",
    "StoreRef",
    "TempFile",
    "Upload",
]


JSON_LIMIT = 256 << 20
"""Largest JSON file read from a store (a manifest of ~500k shards); a record is far smaller."""
JSON_DEPTH = 32
"""Deepest nesting accepted in a store's JSON file (actcache writes at most 5 levels)."""


class DamagedFile(Failure, ValueError):
    """A store file that cannot be what actcache wrote: a link, a FIFO or device, the wrong size, bad JSON.

    A ValueError too, so that callers treating unparsable content as damage treat this the same way.
    """


JSON_DENSITY = 16
"""Fewest bytes per JSON object or list, on average, in a file actcache reads (its own hold one per 100-350). A
forged manifest of ``[{},{},...]`` made Python allocate 48 bytes per byte (47 MB of it: 2.2 GB)."""


def parse_json(data: bytes, what: str) -> Any:
    """JSON from a store file, bounded: nesting deeper than JSON_DEPTH is refused, never a RecursionError, and so
    is a file denser in objects and lists than ``JSON_DENSITY`` (before parsing: see there)."""
    containers = data.count(b"{") + data.count(b"[")
    if containers > len(data) // JSON_DENSITY + 4096:
        raise DamagedFile(
            f"{what} holds {containers} objects and lists in {len(data)} bytes, far more than actcache writes; "
            "not an actcache file"
        )
    try:
        value = json.loads(data)
    except RecursionError:
        raise DamagedFile(f"{what} is nested too deeply to be an actcache file") from None
    except ValueError as e:  # also UnicodeDecodeError
        raise DamagedFile(f"{what} is not valid JSON ({e})") from e
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > JSON_DEPTH:
            raise DamagedFile(f"{what} is nested more than {JSON_DEPTH} levels deep; not an actcache file")
        if isinstance(v, dict):
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)
    return value


def dump_json(obj: Any) -> bytes:
    """Strict JSON (no NaN/Infinity, which other parsers reject) as actcache writes it."""
    return (json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


@dataclass(frozen=True)
class StoreRef:
    """Where a store (or a set inside it) is and how to reach it: one small, picklable value.

    It holds no secret: a Prefect ``AwsCredentials`` block travels by name and is resolved by ``open()``.
    """

    url: str
    """A local folder or any fsspec URL (``s3://bucket/prefix``)."""
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)
    """fsspec options (e.g. ``{"endpoint_url": ...}``), never credentials."""
    credentials_block: str | None = None
    """Name of a Prefect ``AwsCredentials`` block for s3:// (otherwise the AWS chain)."""

    def __post_init__(self) -> None:
        # Every store URL passes here (extract, ls, show, cp, rm, ...): one that holds a credential is refused.
        secrets.check_value(self.url, "the store URL")
        secrets.check_value(self.credentials_block, opt("aws_credentials_block"))
        secrets.check_options(self.storage_options)

    @classmethod
    def of(
        cls, where: str | StoreRef, storage_options: dict[str, Any] | None = None, credentials_block: str | None = None
    ) -> StoreRef:
        """``where`` as a StoreRef: a ref as is, or a URL with its options (the loose form callers still use)."""
        if isinstance(where, StoreRef):
            if storage_options or credentials_block:
                raise TypeError("pass storage options and the credentials block inside the StoreRef, not beside it")
            return where
        return cls(where, dict(storage_options or {}), credentials_block)

    def __repr__(self) -> str:
        # Option values may hold credentials (s3fs takes key=/secret=): only their names are shown.
        names = ", ".join(sorted(map(str, self.storage_options)))
        return (
            f"StoreRef({self.url!r}, storage_options=<{names or 'none'}>, credentials_block={self.credentials_block!r})"
        )

    def open(self) -> Store:
        return Store(self.url, self.storage_options, credentials_block=self.credentials_block)

    def child(self, rel: str) -> StoreRef:
        """The same store's ``rel`` (e.g. a set id) as a ref: a set URL with what it takes to reach it."""
        return replace(self, url=f"{self.url.rstrip('/')}/{rel}")

    def split(self) -> tuple[StoreRef, str]:
        """``<store>/<name>`` -> (the store's ref, name); a bare name is in the current folder."""
        url = self.url.rstrip("/")
        if "/" not in url:
            return replace(self, url="."), url
        parent, name = url.rsplit("/", 1)
        return replace(self, url=parent or "/"), name


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


def _is_marker(path: str, info: dict) -> bool:
    """An object store's folder marker: a zero-byte key ending in ``/`` (a console's "create folder"), no file."""
    return path.endswith("/") and not int(info.get("size") or 0)


def fsspec_options(options: dict[str, Any]) -> dict[str, Any]:
    """Storage options as fsspec takes them: without actcache's own (``deadline``)."""
    return {k: v for k, v in options.items() if k != "deadline"}


class _DeadlinePassed(Exception):
    def __init__(self, seconds: float):
        super().__init__(f"deadline of {seconds:.0f} s passed")
        self.seconds = seconds


class Store:
    """A root URL plus relative paths."""

    part_size = 16 << 20
    """Multipart part size on S3: objects of at least twice this go up in parts, smaller ones in one PUT."""
    part_concurrency = 4
    """Parts uploaded at once: each is a copy of its slice while it is in flight."""

    def __init__(
        self, url: str, storage_options: dict[str, Any] | None = None, *, credentials_block: str | None = None
    ):
        self.url = url.rstrip("/") or url
        self.ref = StoreRef(self.url, dict(storage_options or {}), credentials_block)
        """How to open this store again (elsewhere, in another process)."""
        options = dict(storage_options or {})
        self.deadline = options.pop("deadline", DEADLINE_S)
        if (
            isinstance(self.deadline, bool)
            or not isinstance(self.deadline, (int, float))
            or not 0 < self.deadline < float("inf")  # NaN too
        ):
            # A number is shown as given; any other value is named by its type only (it could be a pasted secret).
            got = repr(self.deadline) if isinstance(self.deadline, (int, float)) else type(self.deadline).__name__
            raise ActcacheError(f"deadline in {opt('storage_options')} must be a positive number of seconds, got {got}")
        if credentials_block:
            if not self.url.startswith(("s3://", "s3a://")):
                raise ActcacheError(
                    f"{opt('aws_credentials_block')} applies to s3:// stores, not {self.url!r}; omit it"
                )
            from actcache.storage.credentials import block_options

            options = block_options(credentials_block, options)
        if self.url.startswith(("s3://", "s3a://")):
            secrets.check_environment()
            options = {**options, "config_kwargs": {**_S3_CONFIG, **options.get("config_kwargs", {})}}
        try:
            fs, self.root = fsspec.core.url_to_fs(self.url, **options)
            _bound_retries(fs)
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
            self._fs = _bound_retries(fsspec.core.url_to_fs(self.url, **self._options)[0])
            self._pid = os.getpid()
        return self._fs

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None, "_pid": None}

    @contextmanager
    def _io(self, action: str, rel: str = "") -> Iterator[None]:
        """Turn storage failures (bucket, credentials, endpoint, 5xx) into one-line errors."""
        try:
            yield
        except _DeadlinePassed as e:
            raise failures.StoreUnavailable(
                f"{action} {self.url_of(rel)} took longer than its {e.seconds:.0f} s deadline: the endpoint answers "
                'too slowly or stalls; check it, or raise {"deadline": SECONDS} in ' + opt("storage_options")
            ) from None
        except Exception as e:
            err = failures.translate(e, self.url_of(rel), action)
            if err is None:
                raise
            raise err from None

    def _call(self, name: str, *args: Any, moves: int = 0, **kwargs: Any) -> Any:
        """``fs.<name>(*args, **kwargs)``, on an async filesystem (S3) within the operation's deadline
        (``DEADLINE_S``, plus a second per ``DEADLINE_RATE`` of the ``moves`` bytes): past it the requests are
        cancelled and ``_DeadlinePassed`` raised (``_io`` makes it one line)."""
        fs = self.fs
        if not getattr(fs, "async_impl", False):
            return getattr(fs, name)(*args, **kwargs)
        timeout = self.deadline + moves / DEADLINE_RATE
        try:
            return fsspec.asyn.sync(fs.loop, getattr(fs, "_" + name), *args, timeout=timeout, **kwargs)
        except fsspec.exceptions.FSTimeoutError:
            raise _DeadlinePassed(timeout) from None

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def child(self, rel: str) -> Store:
        """The store rooted at ``rel`` below this one: same filesystem, options and credentials."""
        sub = copy.copy(self)
        sub.url, sub.root = self.url_of(rel), self.path(rel)
        return sub

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, rel: str = "") -> str:
        return f"{self.url}/{rel}" if rel else self.url

    # -- reading -------------------------------------------------------------------------------
    def listing(self, rel: str) -> dict[str, Entry]:
        """Every file below ``rel`` in one listing, as {path relative to rel: Entry}.

        Only what lies below ``rel/``: not an object named ``rel`` itself (fsspec's ``find`` returns one), nor an
        object store's folder markers (zero-byte ``x/`` keys that consoles write; see ``remove_folder``). A key
        with a doubled slash keeps it (``a//b`` is ``/b`` below ``a``, never ``b``: another object)."""
        found = self._find(rel)
        out = {}
        for p, info in found.items():
            rp = self._below(rel, p, info)
            if rp is not None and not _is_marker(p, info):
                out[rp] = Entry(int(info.get("size") or 0), _mtime(info))
        return out

    def _find(self, rel: str) -> dict[str, dict]:
        """fsspec's ``find`` of ``rel`` (its keys and their info), fresh; {} where nothing is there."""
        base = self.path(rel)
        with self._io("listing", rel):
            self.fs.invalidate_cache(base)  # another process may have written since this one last looked
            try:
                return self._call("find", base, detail=True)
            except FileNotFoundError as e:
                if failures.translate(e, self.url_of(rel), "listing") is not None:
                    raise  # a missing bucket, not a missing folder
                return {}

    def _below(self, rel: str, p: str, info: dict) -> str | None:
        """The path of ``p`` relative to ``rel`` where ``p`` is a file below it; None otherwise."""
        if info.get("type", "file") != "file":
            return None
        base = self.path(rel)
        if p.startswith(base + "/"):
            return p[len(base) + 1 :]
        return None if p == base else p

    def is_file(self, rel: str) -> bool:
        """Whether ``rel`` itself is a file (on an object store: an object of that exact name), not a folder."""
        with self._io("checking", rel):
            return bool(self._call("isfile", self.path(rel)))

    def list_dirs(self, rel: str = "") -> list[str]:
        with self._io("listing", rel):
            self.fs.invalidate_cache(self.path(rel))
            try:
                entries = self._call("ls", self.path(rel), detail=True)
            except FileNotFoundError as e:
                if failures.translate(e, self.url_of(rel), "listing") is not None:
                    raise
                return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")

    def exists(self, rel: str) -> bool:
        with self._io("checking", rel):
            return self._call("exists", self.path(rel))

    def read_bytes(self, rel: str, *, size: int | None = None, limit: int | None = None) -> bytes:
        """The bytes of the regular file ``rel``: exactly ``size`` of them when given, at most ``limit``.

        Locally a symlink anywhere below the store root, a FIFO or a device is refused without blocking
        (``DamagedFile``); object stores have no such files, and a ranged GET reads no more than asked.
        """
        cap = size if size is not None else limit
        if self.local:
            data = self._read_local(rel, None if cap is None else cap + 1)
        else:
            with self._io("reading", rel):
                try:
                    data = (
                        self._call("cat_file", self.path(rel))
                        if cap is None
                        else self._call("cat_file", self.path(rel), start=0, end=cap + 1, moves=size or 0)
                    )
                except OSError as e:
                    if "range is not satisfiable" not in str(e).lower():  # S3's answer for an empty object
                        raise
                    data = b""
        if cap is not None and len(data) > cap:
            raise DamagedFile(f"{self.url_of(rel)} is larger than {cap} bytes")
        if size is not None and len(data) != size:
            raise DamagedFile(f"{self.url_of(rel)} has {len(data)} bytes, expected {size}")
        return data

    def read_mapped(self, rel: str, *, size: int | None = None) -> mmap.mmap | bytes:
        """The bytes of the regular file ``rel`` (exactly ``size`` of them when given) without a copy where the
        store allows: a local file is memory-mapped (copy-on-write, so writes stay private) and its pages faulted
        in now, straight from the page cache; new bytes otherwise (one GET on S3). Refused as ``read_bytes``
        refuses links, FIFOs and devices.

        A reader of a fresh copy pays the page faults of a new allocation, which cost more than the copy itself.
        Files here are only ever replaced whole (temp + rename), never truncated in place, so a mapping stays valid.
        """
        if not self.local:
            if size is not None:
                return self.read_bytes(rel, size=size)  # one ranged GET
            # One GET per file on S3 (s3fs would split a big object into concurrent ranges, then copy them into
            # one): readers that want more in flight read several files at once.
            with self._io("reading", rel):
                return self._call("cat_file", self.path(rel), **({"max_concurrency": 1} if self.s3 else {}))
        with self._open_local(rel) as f:
            n = os.fstat(f.fileno()).st_size
            if size is not None and n != size:
                raise DamagedFile(f"{self.url_of(rel)} has {n} bytes, expected {size}")
            if n == 0:
                return b""  # mmap refuses empty files
            try:
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except OSError as e:
                raise Failure(f"cannot read {self.url_of(rel)} ({e.strerror})") from e
        _prefault(m)
        return m

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the regular file ``rel`` (one ranged GET on object stores); locally refused
        as ``read_bytes`` refuses links, FIFOs and devices."""
        if self.local:
            return self._read_local(rel, max(0, end - start), start)
        with self._io("reading", rel):
            return self._call("cat_file", self.path(rel), start=start, end=end, moves=max(0, end - start))

    def _read_local(self, rel: str, most: int | None, start: int = 0) -> bytes:
        """At most ``most`` bytes of the regular file ``rel`` from ``start`` on (all of them when None)."""
        with self._open_local(rel) as f:
            left = max(0, os.fstat(f.fileno()).st_size - start)
            n = left if most is None else min(left, most)
            try:
                f.seek(start)
                return f.read(n)
            except OSError as e:
                raise Failure(f"cannot read {self.url_of(rel)} ({e.strerror})") from e

    def _open_local(self, rel: str) -> BinaryIO:
        """The regular file ``rel``, open for reading; a symlink below the root, a FIFO or device is refused."""
        path = self.path(rel)
        self._check_inside(rel, path)
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags)  # O_NONBLOCK: a FIFO opens at once (and is refused below) instead of hanging
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise DamagedFile(
                    f"{self.url_of(rel)} is a symlink; actcache reads only regular files it wrote "
                    "(remove it: a rerun rewrites it)"
                ) from None
            if isinstance(e, FileNotFoundError):
                raise
            if e.errno in (errno.ENXIO, errno.EISDIR, errno.ENODEV, errno.ENOTDIR):  # a socket, a folder, a device
                # without driver, a file where a folder of the path should be
                raise DamagedFile(f"{self.url_of(rel)} is not a regular file; remove it: a rerun rewrites it") from e
            raise Failure(f"cannot read {self.url_of(rel)} ({e.strerror})") from e
        # Checked on the descriptor before wrapping it: a folder opens read-only, and fdopen then raises a bare
        # IsADirectoryError naming the descriptor.
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise DamagedFile(
                f"{self.url_of(rel)} is not a regular file (a folder, FIFO, device or socket); "
                "remove it: a rerun rewrites it"
            )
        return os.fdopen(fd, "rb")

    def regular_path(self, rel: str, size: int) -> str:
        """The local path of ``rel``, checked to be a regular file of ``size`` bytes inside the store: for a library
        that opens files by name (a link, FIFO or device there is refused, as ``read_bytes`` refuses it)."""
        path = self.path(rel)
        self._check_inside(rel, path)
        try:
            st = os.lstat(path)
        except OSError as e:
            raise DamagedFile(f"{self.url_of(rel)} is missing ({e.strerror}); rerun the extraction") from e
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            raise DamagedFile(f"{self.url_of(rel)} is not a regular file of {size} bytes; run `actcache verify`")
        return path

    def _check_inside(self, rel: str, path: str) -> None:
        """No symlink between the store root and ``path`` (the root itself may be one): nothing outside is touched."""
        inside = os.path.normpath(os.path.join(os.path.realpath(self.root), os.path.dirname(rel)))
        if os.path.realpath(os.path.dirname(path)) != inside:
            raise DamagedFile(
                f"{self.url_of(rel)} lies below a symlinked folder; actcache reads and writes only "
                f"inside {self.url} (replace the link with a real folder)"
            )

    def _real_folders(self, rel: str) -> None:
        """Replace a symlink where a folder of ``rel`` should be by a real folder (the link only; what it points to
        is left alone), so that a rerun writes inside the store, as readers expect, instead of through it."""
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            p = self.path("/".join(parts[:i]))
            if os.path.islink(p):
                with contextlib.suppress(FileNotFoundError):  # another writer of the set unlinked it first
                    os.unlink(p)

    def read_json(self, rel: str, *, limit: int = JSON_LIMIT) -> Any:
        return parse_json(self.read_bytes(rel, limit=limit), self.url_of(rel))

    # -- writing -------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes | memoryview) -> None:
        """Write ``data`` so that the file either exists in full or not at all.

        A memoryview (a shard's buffer) is written where it lies: locally as is, on S3 one part at a time.
        """
        path = self.path(rel)
        if self.local:
            try:
                self._real_folders(rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
            except OSError as e:
                raise self._write_failure(rel, e, "check the store") from e
            self._check_inside(rel, path)
            pid, start = me()
            tmp = layout.temp_name(path, _HOST, pid, uuid.uuid4().hex[:8], start)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                crashpoints.point("store.temp-written")
                os.replace(tmp, path)
            except BaseException as e:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                if isinstance(e, OSError):  # disk full, file-size limit, read-only, store removed meanwhile, ...
                    raise self._write_failure(rel, e, "free space or fix the store") from e
                raise
        else:
            # One PUT, or a multipart upload that s3fs completes only after every part is in (and aborts
            # on error): a reader never sees a partial object.
            kwargs = {"chunksize": self.part_size, "max_concurrency": self.part_concurrency} if self.s3 else {}
            if isinstance(data, memoryview):
                data = _Parts(data) if self.s3 and len(data) >= 2 * self.part_size else data.tobytes()  # type: ignore[assignment]
            with self._io("writing", rel):
                self._call("pipe_file", path, data, moves=len(data), **kwargs)

    def _write_failure(self, rel: str, e: OSError, fix: str) -> Failure:
        """One line for a local write that failed. A folder where the file should be, or a file where one of its
        folders should be, is named as such: not deleted (actcache did not write it), and no space to free."""
        if e.errno in (errno.EISDIR, errno.ENOTDIR, errno.EEXIST):
            return Failure(
                f"cannot write {self.url_of(rel)}: a folder stands where the file should be, or a file where one of "
                "its folders should be; actcache deletes only what it wrote: remove it by hand, then rerun"
            )
        why = e.strerror or e
        return Failure(f"cannot write {self.url_of(rel)} ({why}); {fix}, then rerun: finished shards are kept")

    def temp_files(self, rel: str = "") -> list[TempFile]:
        """Every writer's temp file below ``rel`` (local stores only: an object store's upload is invisible until
        complete, see ``incomplete_uploads``). Symlinked folders are not entered: nothing beyond them is ours."""
        return housekeeping.temp_files(self, rel)

    def sweep_temp(self, rel: str) -> int:
        """Delete temp files left below ``rel`` by killed writers of this host; return how many.

        Temp names carry host and pid, so a live writer's file (or another host's) is never touched; nor is a file
        whose name merely looks like one, where actcache would not have written it (``layout.is_store_file``).
        """
        dead = [t.rel for t in self.temp_files(rel) if t.writer_dead and layout.is_store_file(t.target)]
        self.remove(dead)
        return len(dead)

    def symlink_in(self, rel: str, *, below: bool = True) -> str | None:
        """The first symlink (relative to the root) on the way from the root to ``rel``, ``rel`` itself, or (with
        ``below``) anything inside it; None if there is none, and always on object stores, which have no links.
        The root itself may be a link: it is what the user named."""
        if not self.local:
            return None
        parts = [p for p in rel.split("/") if p]
        for i in range(1, len(parts) + 1):
            if os.path.islink(self.path("/".join(parts[:i]))):
                return "/".join(parts[:i])
        if below and os.path.isdir(self.path(rel)):
            for dirpath, dirs, files in os.walk(self.path(rel)):
                for name in sorted(dirs + files):
                    full = os.path.join(dirpath, name)
                    if os.path.islink(full):
                        return os.path.relpath(full, self.root)
        return None

    def remove(self, rels: list[str]) -> None:
        """Delete these files (one bulk request per 1000 on S3); files already gone are no error.

        Locally a file below a symlinked folder is refused (``DamagedFile``), never deleted through the link; a link
        itself is only unlinked, what it points to is left alone."""
        if not rels:
            return
        if self.local:
            for rel in rels:
                path = self.path(rel)
                self._check_inside(rel, path)
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                        raise ActcacheError(
                            f"cannot delete {self.url_of(rel)} ({e.strerror}): the store is read-only or not yours; "
                            "run this where it can be written"
                        ) from None
                    raise Failure(f"cannot delete {self.url_of(rel)} ({e.strerror}); rerun to finish") from e
            return
        self._delete([self.path(r) for r in rels], rels[0])

    def _delete(self, paths: list[str], first: str) -> None:
        """Delete exactly these keys of an object store: fsspec's ``rm`` globs (``run[1]/x`` would delete
        ``run1/x``, another store's file), so S3 gets bulk deletes of the literal keys, other stores one by one."""
        with self._io("deleting", first):
            if self.s3:
                bucket = self.root.partition("/")[0]
                for i in range(0, len(paths), 1000):  # S3's limit per DeleteObjects request
                    chunk = paths[i : i + 1000]
                    objects = [{"Key": p.partition("/")[2]} for p in chunk]
                    out = self._call(
                        "call_s3", "delete_objects", Bucket=bucket, Delete={"Objects": objects, "Quiet": True}
                    )
                    for p in chunk:
                        self.fs.invalidate_cache(p.rsplit("/", 1)[0])
                    if out.get("Errors"):  # S3 answers 200 and lists the keys it did not delete (access denied, ...)
                        raise self._delete_failure(out["Errors"][0], len(out["Errors"]))
                return
            for p in paths:
                try:
                    self._call("rm_file", p)
                except FileNotFoundError:
                    pass

    def _delete_failure(self, error: dict, n: int) -> ActcacheError:
        """One line for keys a bulk delete refused (the first of ``n``), by the error code only."""
        root_key = self.root.partition("/")[2]
        key = str(error.get("Key", ""))
        url = self.url_of(key[len(root_key) + 1 :] if root_key and key.startswith(root_key + "/") else key)
        code = str(error.get("Code") or "error")
        if code in failures.DENIED:
            return ActcacheError(
                f"access denied while deleting {url} ({code}; {n} object(s) not deleted): the credentials may read "
                "this store but not delete from it; run this with credentials that may"
            )
        return Failure(f"cannot delete {url} ({code}; {n} object(s) not deleted); rerun to finish")

    def remove_folder(self, rel: str) -> None:
        """Remove what is left of the folder ``rel`` once its files are deleted: empty directories locally, and on
        an object store the zero-byte folder markers (``rel/``, ``rel/x/``) of folders that hold nothing else. A
        folder reached through a symlink is left alone."""
        if not self.local:
            found = self._find(rel)
            markers = [p for p, info in found.items() if _is_marker(p, info) and p.startswith(self.path(rel) + "/")]
            rest = [p for p, info in found.items() if not _is_marker(p, info) and self._below(rel, p, info)]
            empty = [m for m in markers if not any(p.startswith(m) for p in rest)]
            if empty:
                self._delete(empty, rel)
            return
        if os.path.isdir(self.path(rel)) and self.symlink_in(rel, below=False) is None:
            for dirpath, _, _ in sorted(os.walk(self.path(rel)), key=lambda w: -len(w[0])):
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass  # not empty: a file written since the listing stays, and so does its folder

    def incomplete_uploads(self, rel: str = "") -> list[Upload]:
        """S3 multipart uploads below ``rel`` that were started and never completed nor aborted (a killed writer's,
        or one in progress): invisible to listings, yet their parts are stored and billed."""
        return housekeeping.incomplete_uploads(self, rel)

    def abort_upload(self, upload: Upload) -> None:
        housekeeping.abort_upload(self, upload)

    def remove_tree(self, rel: str) -> None:
        """Delete every file below ``rel``, then the folder (nothing there is fine). Only the files the listing
        names (never fsspec's recursive ``rm``, which globs): not an object named ``rel`` itself, nothing beside it,
        nothing through a symlink."""
        self.remove([f"{rel}/{r}" for r in self.listing(rel)])
        self.remove_folder(rel)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, dump_json(obj))

    def check_writable(self, given_as: str | None = None) -> None:
        """Fail early, writing nothing, if the store cannot hold a set. ``given_as``: how the user gave this store,
        for the message (default the ``store`` field; shuffle's ``out``, copy's destination)."""
        given_as = given_as or opt("store")
        if not self.local:
            self.check_reachable()  # bucket, credentials and endpoint; a denied write fails at once, unretried
            return
        p = self.root
        if os.path.isfile(p):
            raise ActcacheError(f"store {self.url!r} is a file; pass a directory (or a new path) as {given_as}")
        if os.path.islink(p) and not os.path.exists(p):
            raise ActcacheError(f"store {self.url!r} is a dangling symlink; pass a folder or a new path as {given_as}")
        if (held := layout_folder_holding(p)) is not None:
            raise ActcacheError(
                f"store {self.url!r} lies inside {held!r}, a folder of a store's own layout (a set, _tokens or "
                f"_content); pass a directory outside it as {given_as}"
            )
        while not os.path.exists(p):
            parent = os.path.dirname(p)
            if parent == p:
                break
            p = parent
        if os.path.isfile(p):
            raise ActcacheError(f"store {self.url!r} is inside the file {p!r}; pass a directory as {given_as}")
        try:  # a real probe: os.access says yes to root even where writes fail (read-only mounts, sysfs)
            fd, probe = tempfile.mkstemp(prefix=".actcache-probe-", dir=p)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            other = given_as.removeprefix("the ")  # "choose another destination store"
            if p != self.root:  # the store does not exist yet: it is what cannot be made (not the parent's fault)
                # "not writable" only for a denied write: /proc answers ENOENT, which would read as a contradiction
                why = "is not writable" if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else "takes no new files"
                raise ActcacheError(
                    f"cannot create store {self.url!r} ({other}): {p!r}, the nearest folder of it that exists, {why} "
                    f"({e.strerror}); choose another {other}"
                ) from None
            raise ActcacheError(
                f"store {self.url!r} is not writable ({e.strerror}); choose another {other} or fix its permissions"
            ) from None

    def check_reachable(self) -> None:
        """Fail now, saying what to fix, if the store is missing, unreachable or refuses these credentials."""
        if self.local:
            if not os.path.isdir(self.root):
                raise ActcacheError(f"store {self.url!r} {_not_a_folder(self.root)}")
            return
        self.list_dirs()  # one request: NoSuchBucket, InvalidAccessKeyId, AccessDenied, connection refused


def _not_a_folder(path: str) -> str:
    """Why ``path`` is not a directory, in words: missing, a dangling link, a link loop, or another kind of file."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a loop of symlinks, not a directory"
        if os.path.islink(path):
            return f"is a symlink to {os.readlink(path)!r}, which does not exist"
        if e.errno == errno.ENOENT:
            return "does not exist (no such directory)"
        return f"cannot be read ({e.strerror})"
    kind = next(
        (
            name
            for test, name in (
                (stat.S_ISFIFO, "a FIFO"),
                (stat.S_ISSOCK, "a socket"),
                (stat.S_ISCHR, "a device"),
                (stat.S_ISBLK, "a device"),
            )
            if test(mode)
        ),
        "a file",
    )
    return f"is {kind}, not a directory; pass the store's folder"
