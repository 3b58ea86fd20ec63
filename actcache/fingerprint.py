"""Content hashes of files, memoised by (path, size, mtime) so that a rerun does not re-read gigabytes."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

_LOCK = threading.Lock()


def cache_dir() -> Path:
    base = os.environ.get("ACTCACHE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "actcache")
    return Path(base)


def _memo_path() -> Path:
    return cache_dir() / "file-hashes.json"


def _load_memo() -> dict:
    try:
        return json.loads(_memo_path().read_text())
    except (OSError, ValueError):
        return {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a local file's bytes; cached while its size and mtime are unchanged."""
    p = os.path.realpath(path)
    st = os.stat(p)
    stamp = f"{st.st_size}:{st.st_mtime_ns}"
    memo = _load_memo()
    hit = memo.get(p)
    if hit and hit[0] == stamp:
        return hit[1]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    with _LOCK:
        memo = _load_memo()
        memo[p] = [stamp, digest]
        try:
            _memo_path().parent.mkdir(parents=True, exist_ok=True)
            tmp = _memo_path().with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, _memo_path())
        except OSError:
            pass  # the memo is an optimisation only
    return digest


def combine(parts: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
