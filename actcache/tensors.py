"""A shard's tensors in either layout, checksum-verified: for code that reads every row of a set once.

Column sets (extraction): ``activations [n_seq, context_size, d]`` and ``tokens [n_seq, context_size]``.
"Rows" sets (``actcache shuffle``): ``activations [n, d]``, ``tokens [n]`` and ``positions [n]``.
"""

from __future__ import annotations

import hashlib

import torch

from actcache import shard
from actcache.errors import Failure
from actcache.reader import ActivationSet
from actcache.records import Record
from actcache.store import DamagedFile


def is_rows(s: ActivationSet) -> bool:
    return s.manifest.get("layout") == "rows"


def read(s: ActivationSet, r: Record) -> dict[str, torch.Tensor]:
    """Shard ``r`` of ``s``, at most its recorded size read, its sha256 checked, its names, dtypes and shapes those
    the key implies (``ActivationSet.expect``)."""
    try:
        data = s.store.read_bytes(f"{s.set_id}/{r.file}", size=r.bytes)
    except DamagedFile as e:
        raise DamagedFile(f"shard {r.index} of {s.url} is unreadable ({e}); run `actcache verify` and repair the "
                          "set first") from e
    if hashlib.sha256(data).hexdigest() != r.sha256:
        raise Failure(f"shard {r.index} of {s.url} fails its checksum; run `actcache verify` and repair the set "
                      "first")
    try:
        return shard.decode(data, codec=s.manifest["codec"], expect=s.expect(r))
    except ValueError as e:
        raise DamagedFile(f"shard {r.index} of {s.url} is unreadable ({e})") from e
