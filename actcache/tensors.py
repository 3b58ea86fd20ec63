"""A shard's tensors in either layout, checksum-verified: for code that reads every row of a set once.

Column sets (extraction): ``activations [n_seq, context_size, d]`` and ``tokens [n_seq, context_size]``.
"Rows" sets (``actcache shuffle``): ``activations [n, d]``, ``tokens [n]`` and ``positions [n]``.
"""

from __future__ import annotations

import hashlib

import torch

from actcache import shard
from actcache.errors import ActcacheError
from actcache.reader import ActivationSet
from actcache.records import Record


def is_rows(s: ActivationSet) -> bool:
    return s.manifest.get("layout") == "rows"


def read(s: ActivationSet, r: Record) -> dict[str, torch.Tensor]:
    """Shard ``r`` of ``s``, its sha256 checked, its names, dtypes and shapes those the manifest implies."""
    m = s.manifest
    data = s.store.read_bytes(f"{s.set_id}/{r.file}")
    if hashlib.sha256(data).hexdigest() != r.sha256:
        raise ActcacheError(f"shard {r.index} of {s.url} fails its checksum; run `actcache verify` and repair the "
                            "set first")
    dtype, d = shard.TORCH_DTYPES[m["dtype"]], m["d"]
    if is_rows(s):
        n = r.n_tokens
        expect = {"activations": (dtype, (n, d)), "tokens": (torch.int32, (n,)), "positions": (torch.int64, (n,))}
    else:
        ctx = m["key"]["tokens"]["context_size"]
        expect = {"activations": (dtype, (r.n_seq, ctx, d)), "tokens": (torch.int32, (r.n_seq, ctx))}
    try:
        return shard.decode(data, codec=m["codec"], expect=expect)
    except ValueError as e:
        raise ActcacheError(f"shard {r.index} of {s.url} is unreadable ({e})") from None
