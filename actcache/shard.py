"""The shard format: a plain safetensors file (optionally compressed) holding ``activations`` and ``tokens``.

Any safetensors reader opens an uncompressed shard with no actcache code. Reading never unpickles:
safetensors validates its own header offsets, and ``decode`` checks names, dtypes and shapes.

Codecs: ``zstd`` is one zstd frame of the safetensors file. ``shuffle-zstd`` first byte-shuffles the tensor
data (everything after the header, which stays readable) with the element size of ``activations``: all
first bytes of every element, then all second bytes, ... Activations' sign/exponent bytes are far more
alike than their low mantissa bytes, so zstd finds more to share (bench: 8-12% smaller than plain zstd, and
faster). To undo it without actcache: zstd -d, then for the data after byte 8 + header length,
``np.frombuffer(body, np.uint8).reshape(itemsize, -1).T.tobytes()`` (plus the trailing len % itemsize bytes).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Encoded:
    data: bytes
    raw_bytes: int
    """Size of the safetensors payload before the codec."""
    sha256: str


def header_metadata(metadata: dict[str, str] | None) -> dict[str, str] | None:
    """The safetensors ``__metadata__`` of a shard: one key, so its bytes do not depend on a hash order."""
    # safetensors writes its metadata map in hash order: one key (sorted JSON inside) keeps bytes reproducible.
    return {"actcache": json.dumps(metadata, sort_keys=True, separators=(",", ":"))} if metadata else None


def encode(tensors: dict[str, torch.Tensor], *, codec: str = "none", level: int = 0,
           metadata: dict[str, str] | None = None) -> Encoded:
    """The reference encoder (token shards use it; ``shardfile`` writes the same bytes without the copies)."""
    raw = st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=header_metadata(metadata))
    data = raw
    if codec in ("zstd", "shuffle-zstd"):
        import zstandard

        data = zstandard.ZstdCompressor(level=level).compress(shuffle(raw) if codec == "shuffle-zstd" else raw)
    elif codec != "none":
        raise ValueError(f"unknown codec {codec!r}")
    return Encoded(data, len(raw), hashlib.sha256(data).hexdigest())


def decode(data: bytes, *, codec: str, expect: dict[str, tuple[torch.dtype, tuple[int, ...] | None]] | None = None
           ) -> dict[str, torch.Tensor]:
    """Decode shard bytes; ``expect`` maps tensor name to (dtype, shape or None) and is enforced."""
    if codec in ("zstd", "shuffle-zstd"):
        import zstandard

        # A frame may claim (or inflate to) any size: with every shape known, refuse more than they can fill
        # before allocating (a few KB of crafted zstd would otherwise take gigabytes).
        limit = _payload_limit(expect)
        size = zstandard.frame_content_size(data)
        if limit and size > limit:
            raise ValueError(f"zstd frame declares {size} bytes, more than the expected tensors fill ({limit})")
        data = zstandard.ZstdDecompressor().decompress(data, max_output_size=limit or 0)
        if codec == "shuffle-zstd":
            data = unshuffle(data)
    elif codec != "none":
        raise ValueError(f"unknown codec {codec!r}")
    tensors = st_load(data)
    for name, (dtype, shape) in (expect or {}).items():
        t = tensors.get(name)
        if t is None:
            raise ValueError(f"shard has no tensor {name!r} (has {sorted(tensors)})")
        if t.dtype != dtype or (shape is not None and tuple(t.shape) != tuple(shape)):
            raise ValueError(f"shard tensor {name!r} is {t.dtype}{list(t.shape)}, expected {dtype}{list(shape or [])}")
    return tensors


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}


def _split(raw: bytes) -> tuple[int, int]:
    """(offset where tensor data starts, element size of ``activations``) from a safetensors header."""
    if len(raw) < 8:
        raise ValueError("shard too short for a safetensors header")
    start = 8 + int.from_bytes(raw[:8], "little")
    if start > len(raw) or start - 8 > _HEADER_ALLOWANCE:
        raise ValueError("safetensors header length out of range")
    try:
        header = json.loads(raw[8:start])
        itemsize = _ITEMSIZE[header["activations"]["dtype"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"shard header has no readable activations dtype ({type(e).__name__})") from None
    return start, itemsize


def _transpose(raw: bytes, forward: bool) -> bytes:
    start, itemsize = _split(raw)
    body = np.frombuffer(raw, np.uint8, offset=start)
    n = len(body) // itemsize * itemsize
    shape = (-1, itemsize) if forward else (itemsize, -1)
    return raw[:start] + body[:n].reshape(shape).T.tobytes() + body[n:].tobytes()


def shuffle(raw: bytes) -> bytes:
    """Byte-shuffle a safetensors file's tensor data by the element size of ``activations``; header untouched."""
    return _transpose(raw, forward=True)


def unshuffle(data: bytes) -> bytes:
    return _transpose(data, forward=False)


_HEADER_ALLOWANCE = 1 << 20
"""Bytes allowed for a safetensors header (names, shapes, offsets, metadata) on top of the tensor data."""


def _payload_limit(expect: dict[str, tuple[torch.dtype, tuple[int, ...] | None]] | None) -> int | None:
    if not expect or any(shape is None for _, shape in expect.values()):
        return None
    total = _HEADER_ALLOWANCE
    for dtype, shape in expect.values():
        n = dtype.itemsize
        for s in shape:
            n *= s
        total += n
    return total


STATS_CHUNK_BYTES = 1 << 20
"""float32 scratch for the stats: rows are upcast this much at a time, not the whole shard at once. Small: a
16 MiB scratch, allocated on a pool thread beside the forward pass's batches, fragmented glibc's heaps by about
the size of a shard (bench: memory)."""


def stats(acts: torch.Tensor) -> dict[str, float | int]:
    """Mean L2 norm per token and NaN/Inf counts, for the manifest (computed in float32)."""
    flat = acts.reshape(-1, acts.shape[-1])
    # One pass, upcast on the fly: a NaN or Inf anywhere makes its row's norm non-finite, so all-finite
    # norms mean no NaN or Inf at all. Only otherwise (or on a float32 overflow) the full count below runs:
    # it is ~30x slower (90 ms per 8192 x 768 shard, competing with the forward pass for the CPU).
    # In row chunks: vector_norm(dtype=float32) of a float16 tensor makes a float32 copy of all of it first
    # (twice the shard). Norms are per row, so the chunks give the same norms and the same mean.
    step = max(1, STATS_CHUNK_BYTES // (4 * max(1, flat.shape[-1])))
    norms = torch.empty(len(flat), dtype=torch.float32)
    for i in range(0, len(flat), step):
        torch.linalg.vector_norm(flat[i : i + step], dim=-1, dtype=torch.float32, out=norms[i : i + step])
    if bool(torch.isfinite(norms).all()):
        return {"mean_l2_norm": round(float(norms.mean()), 6) if len(norms) else 0.0, "nan": 0, "inf": 0}
    nan = inf = 0
    for i in range(0, len(flat), step):
        part = flat[i : i + step].float()
        finite = torch.isfinite(part)
        norms[i : i + step] = torch.linalg.vector_norm(torch.where(finite, part, 0.0), dim=-1)
        nan += int(torch.isnan(part).sum())
        inf += int(torch.isinf(part).sum())
    return {"mean_l2_norm": round(float(norms.mean()), 6) if len(norms) else 0.0, "nan": nan, "inf": inf}
