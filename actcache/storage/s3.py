"""S3's side of the store: its deadlines and retries, and multipart uploads that never copy a shard whole."""

from __future__ import annotations

import fsspec

# Deadlines (docs/trust.md): a request waits at most S3_READ_TIMEOUT s for an answer (S3_CONNECT_TIMEOUT for a
# connection) and is retried S3_ATTEMPTS times by botocore (AWS's "standard" mode: also 5xx and throttling, with a
# backoff of a few seconds) inside S3FS_RETRIES of s3fs's tries: a silent endpoint is one line within about
# (S3_ATTEMPTS + 1) * (S3_READ_TIMEOUT + 2) s (measured: 30 s at a 6 s read timeout, 4 connections).
# botocore's defaults (60 s reads, legacy retries) inside s3fs's 5 tries kept a hung endpoint silent for minutes.
# ``config_kwargs`` in the storage options override these (e.g. {"read_timeout": 120} for a slow gateway).
S3_CONNECT_TIMEOUT, S3_READ_TIMEOUT, S3_ATTEMPTS, S3FS_RETRIES = 5, 8, 3, 1
DEADLINE_S = 60
"""Overall deadline of one storage operation on an object store (all its requests and tries), in seconds, plus
one second per ``DEADLINE_RATE`` bytes it moves: an endpoint that answers a byte every few seconds never trips a
read timeout, and this ends it. ``{"deadline": SECONDS}`` in the storage options changes the 60."""
DEADLINE_RATE = 1 << 20
_S3_CONFIG = {
    "retries": {"mode": "standard", "max_attempts": S3_ATTEMPTS},
    "connect_timeout": S3_CONNECT_TIMEOUT,
    "read_timeout": S3_READ_TIMEOUT,
}
_MADV_POPULATE_READ = 22  # linux/mman.h; Python's mmap module does not name it yet


def _bound_retries(fs: fsspec.AbstractFileSystem) -> fsspec.AbstractFileSystem:
    """s3fs's own tries around botocore's (a class attribute, not an option: an option would reach botocore)."""
    if type(fs).__name__ == "S3FileSystem":
        fs.retries = S3FS_RETRIES
    return fs


class _Parts:
    """A buffer that s3fs's multipart upload slices into parts (it only takes ``len`` and slices): each part
    becomes bytes only while it is uploaded, so a shard is never copied whole (botocore takes no memoryview)."""

    def __init__(self, view: memoryview):
        self.view = view

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, part: slice) -> bytes:
        return self.view[part].tobytes()
