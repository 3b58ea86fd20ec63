"""What writers leave behind: local temp files (with the host and pid that wrote them) and S3 multipart uploads
never completed; listed for ``actcache gc`` and for sweeping a killed writer's files."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from actcache.format import layout

if TYPE_CHECKING:
    from actcache.storage.store import Store


@dataclass(frozen=True)
class TempFile:
    """A local writer's temp file (``<name>.tmp-<host>-<pid>.<start>-<random>``, see ``layout.temp_name``)."""

    rel: str
    target: str
    """The file it becomes once renamed (relative to the store's root)."""
    host: str
    pid: int
    size: int
    mtime: float
    same_host: bool
    writer_dead: bool
    """Written by a process of this host that no longer runs (another host's writer cannot be checked)."""


@dataclass(frozen=True)
class Upload:
    """An S3 multipart upload that was started and neither completed nor aborted."""

    rel: str
    upload_id: str
    initiated: float
    """Seconds since the epoch."""
    size: int
    """Bytes of the parts uploaded so far."""


_HOST = socket.gethostname().replace("-", "_")


def process_start(pid: int) -> int | None:
    """When process (or thread) ``pid`` of this host started, in clock ticks since boot; None where the host does
    not say (no Linux ``/proc``) or no such process runs. With the pid it names one process for good: a pid alone is
    given to the next process once its own has ended, and a busy host wraps its pids within minutes."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # Field 22; the name in parentheses before it may hold spaces and parentheses of its own.
        return int(stat.rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


_ME: tuple[int, int | None] = (-1, None)


def me() -> tuple[int, int | None]:
    """(pid, start) of this process, as ``_alive`` checks them (computed again in a forked child)."""
    global _ME
    pid = os.getpid()
    if _ME[0] != pid:
        _ME = (pid, process_start(pid))
    return _ME


def _alive(pid: int, start: int | None = None) -> bool:
    """Whether the writer ``pid`` of this host still runs: where its name carries its ``start``, only while the
    process now holding that pid is the one that started then."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: its start still says whether it is the writer
    if start is None:
        return True
    now = process_start(pid)
    return now is None or now == start  # unreadable (the host hides it): as live, as before the start was known


def temp_files(store: Store, rel: str = "") -> list[TempFile]:
    """Every writer's temp file below ``rel`` (local stores only: an object store's upload is invisible until
    complete, see ``incomplete_uploads``). Symlinked folders are not entered: nothing beyond them is ours."""
    if not store.local or store.symlink_in(rel, below=False):
        return []
    out = []
    for dirpath, _, files in os.walk(store.path(rel)):  # os.walk enters no symlinked folder
        for name in files:
            parsed = layout.parse_temp(name)
            full = os.path.join(dirpath, name)
            if parsed is None or os.path.islink(full):
                continue
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue  # renamed into place since the walk
            target, host, pid, start = parsed
            mine = host == _HOST
            out.append(
                TempFile(
                    os.path.relpath(full, store.root),
                    os.path.relpath(os.path.join(dirpath, target), store.root),
                    host,
                    pid,
                    st.st_size,
                    st.st_mtime,
                    mine,
                    mine and not _alive(pid, start),
                )
            )
    return out


def incomplete_uploads(store: Store, rel: str = "") -> list[Upload]:
    """S3 multipart uploads below ``rel`` that were started and never completed nor aborted (a killed writer's,
    or one in progress): invisible to listings, yet their parts are stored and billed."""
    if not store.s3:
        return []
    bucket, _, prefix = store.path(rel).partition("/")
    prefix = f"{prefix}/" if prefix else ""
    out, page = [], {"Bucket": bucket, "Prefix": prefix}
    page_args: dict[str, Any] = page
    with store._io("listing uploads", rel):
        while True:
            resp = store._call("call_s3", "list_multipart_uploads", **page_args)
            for u in resp.get("Uploads", []):
                parts = store._call("call_s3", "list_parts", Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
                size = sum(p.get("Size", 0) for p in parts.get("Parts", []))
                root_key = store.root.partition("/")[2]  # exactly one "/" after it: ``a//b`` is not ``a/b``
                key_rel = u["Key"][len(root_key) + 1 :] if root_key else u["Key"]
                out.append(Upload(key_rel, u["UploadId"], u["Initiated"].timestamp(), size))
            if not resp.get("IsTruncated"):
                return out
            page.update(KeyMarker=resp["NextKeyMarker"], UploadIdMarker=resp["NextUploadIdMarker"])


def abort_upload(store: Store, upload: Upload) -> None:
    bucket = store.root.partition("/")[0]
    with store._io("aborting an upload of", upload.rel):
        store._call(
            "call_s3",
            "abort_multipart_upload",
            Bucket=bucket,
            Key=store.path(upload.rel).partition("/")[2],
            UploadId=upload.upload_id,
        )
