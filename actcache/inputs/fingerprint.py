"""Content hashes of files, memoised by (path, size, mtime) so that a rerun does not re-read gigabytes."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from actcache.errors import ActcacheError

_LOCK = threading.Lock()
# Entries kept per memo file: each new entry rewrites the whole file, so an unbounded one (a dataset of many
# files, datasets that come and go) would grow without end and slow every write down with it.
MAX_ENTRIES = 10_000


def cache_dir() -> Path:
    base = os.environ.get("ACTCACHE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "actcache"
    )
    return Path(base)


def write_quietly(path: str | os.PathLike, data: str | bytes) -> None:
    """Write a small cache file whole (temp + rename: no reader sees half of it), best effort: a cache that cannot
    be written (read-only, full) only makes the next run slower."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        os.replace(tmp, path)
    except OSError:
        pass


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _prune(memo: dict, stale: Callable[[str], bool] | None) -> dict:
    """At most ``MAX_ENTRIES`` entries: stale ones go first, then the oldest written (JSON keeps their order)."""
    if len(memo) <= MAX_ENTRIES:
        return memo
    if stale is not None:
        memo = {k: v for k, v in memo.items() if not stale(k)}
    return dict(list(memo.items())[-MAX_ENTRIES:])


def _remember(path: Path, key: str, value: Any, stale: Callable[[str], bool] | None = None) -> None:
    with _LOCK:
        memo = _read(path)  # again, under the lock: another thread or process may have added entries
        memo.pop(key, None)  # a rewritten entry counts as the newest
        memo[key] = value
        memo = _prune(memo, stale)
        write_quietly(path, json.dumps(memo))  # the memo is an optimisation only


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a local file's bytes; cached while its size and mtime are unchanged."""
    p = os.path.realpath(path)
    st = os.stat(p)
    if not stat.S_ISREG(st.st_mode):  # /dev/zero, a FIFO: hashed without end, or blocking
        raise ActcacheError(
            f"{os.fspath(path)!r} is not a regular file (a device, FIFO or socket): it cannot be read to its end; "
            "remove it or the link to it"
        )
    stamp = f"{st.st_size}:{st.st_mtime_ns}"
    memo_path = cache_dir() / "file-hashes.json"
    hit = _read(memo_path).get(p)
    if hit and hit[0] == stamp:
        return hit[1]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    _remember(memo_path, p, [stamp, digest], stale=lambda k: not os.path.exists(k))
    return digest


def remembered(table: str, key: str, compute: Callable[[], Any]) -> Any:
    """``compute()``, kept on disk under ``key``: the key must be a content hash of everything the value depends on
    (it is never invalidated otherwise)."""
    path = cache_dir() / f"{table}.json"
    hit = _read(path).get(key)
    if hit is not None:
        return hit
    value = compute()
    _remember(path, key, value)
    return value


def combine(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
