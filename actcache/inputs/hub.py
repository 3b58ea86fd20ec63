"""Asking the Hugging Face Hub which commit a model or dataset name points at: once per plan, never per shard.

A revision that is already a full commit sha is its own answer (no request). Rate limits (429) and server
errors (5xx) are retried with backoff, honouring ``Retry-After``; a hub that does not answer at all falls
back to the local HF cache (the commit a previous download recorded), so a cached model works offline.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
_SHA = re.compile(r"^[0-9a-f]{40}\Z")
DELAYS = (1.0, 2.0, 4.0, 8.0)
"""Seconds between attempts on 429/5xx when the hub sends no ``Retry-After`` (then at most ``MAX_WAIT``)."""
MAX_WAIT = 60.0
_sleep = time.sleep  # tests count the waits instead of sleeping


def is_commit(revision: str | None) -> bool:
    return bool(revision and _SHA.match(revision))


def first_line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:200]


def _status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def _retry_after(e: BaseException) -> float | None:
    response = getattr(e, "response", None)
    value = getattr(response, "headers", {}).get("Retry-After") if response is not None else None
    return float(value) if value and str(value).strip().isdigit() else None


def with_backoff(call: Callable[[], T]) -> T:
    """``call()``, again after a pause while the hub answers 429 or 5xx; other errors are raised at once."""
    for delay in (*DELAYS, None):
        try:
            return call()
        except Exception as e:
            status = _status(e)
            if delay is None or status is None or not (status == 429 or status >= 500):
                raise
            asked = _retry_after(e)
            _sleep(min(delay if asked is None else asked, MAX_WAIT))
    raise AssertionError("unreachable")


def _ref_file(repo_id: str, revision: str | None, repo_type: str) -> str:
    """Where the HF cache records the commit a branch or tag pointed at (``<cache>/models--org--name/refs/main``)."""
    from huggingface_hub import constants

    folder = os.path.join(constants.HF_HUB_CACHE, f"{repo_type}s--" + repo_id.replace("/", "--"))
    return os.path.join(folder, "refs", revision or "main")


def _cached_commit(repo_id: str, revision: str | None, repo_type: str) -> str | None:
    """The commit the local HF cache last recorded for ``repo_id`` at ``revision``, if any."""
    try:
        with open(_ref_file(repo_id, revision, repo_type)) as f:
            sha = f.read().strip()
    except OSError:
        return None
    return sha if _SHA.match(sha) else None


def _remember(repo_id: str, revision: str | None, repo_type: str, sha: str) -> None:
    # Files are then fetched by sha, which records no ref: record it as huggingface_hub does for a branch
    # download, so that the next run finds this commit offline.
    from actcache.inputs.fingerprint import write_quietly

    write_quietly(_ref_file(repo_id, revision, repo_type), sha)  # a read-only cache: the next run asks the hub


def commit(repo_id: str, revision: str | None, repo_type: str = "model") -> tuple[str | None, BaseException | None]:
    """(commit sha of ``repo_id`` at ``revision``, None) or (None, why the hub and the cache had no answer)."""
    if is_commit(revision):
        return revision, None
    try:
        from huggingface_hub import HfApi

        info = getattr(HfApi(), f"{repo_type}_info")
        sha = with_backoff(lambda: info(repo_id, revision=revision)).sha
    except Exception as e:
        status = _status(e)
        if status is not None and status < 500 and status != 429:
            return None, e  # the hub answered: no such repo or revision (a stale cache must not say otherwise)
        cached = _cached_commit(repo_id, revision, repo_type)
        return (cached, None) if cached else (None, e)
    _remember(repo_id, revision, repo_type, sha)
    return sha, None


def why(err: BaseException | None) -> str:
    """What the hub said, for a one-line error: it has no such repo/revision, or it did not answer."""
    status = _status(err) if err is not None else None
    if err is not None and status is not None and status < 500 and status != 429:
        return f"the hub answered {status} ({first_line(err)})"  # no such repo/revision, gated, private
    return f"the hub did not answer ({first_line(err) if err else 'offline'})"
