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
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import save as st_save

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Encoded:
    data: bytes
    raw_bytes: int
    """Size of the safetensors payload before the codec."""
    sha256: str


def encode(tensors: dict[str, torch.Tensor], *, codec: str = "none", level: int = 0,
           metadata: dict[str, str] | None = None) -> Encoded:
    # safetensors writes its metadata map in hash order: one key (sorted JSON inside) keeps bytes reproducible.
    meta = {"actcache": json.dumps(metadata, sort_keys=True, separators=(",", ":"))} if metadata else None
    raw = st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)
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
    return views(data, expect)


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "U8": torch.uint8, "I8": torch.int8,
              "BOOL": torch.bool}
_MAX_HEADER = 100_000_000  # safetensors' own limit

# torch.frombuffer warns (once per process) that a bytes object is read-only; the tensors made here own
# their bytes object alone, so writing to them changes nothing anyone else sees.
warnings.filterwarnings("ignore", message="The given buffer is not writable", module=__name__)


def header(data: bytes | bytearray | memoryview, size: int | None = None
           ) -> tuple[int, dict[str, tuple[torch.dtype, list[int], int, int]]]:
    """(offset where tensor data starts, {name: (dtype, shape, begin, end)}) of a
    safetensors file of ``size`` bytes, validated as safetensors itself does: sizes match shapes, the tensors
    tile the data and end where the file does.

    ``data`` may be only the beginning of the file, as long as it holds the header.
    """
    buf = memoryview(data)
    size = buf.nbytes if size is None else size
    if buf.nbytes < 8:
        raise ValueError("header too small: not a safetensors file")
    n = int.from_bytes(buf[:8], "little")
    if n > _MAX_HEADER or 8 + n > buf.nbytes:
        raise ValueError(f"header too large: {n} bytes declared, {buf.nbytes - 8} present")
    try:
        parsed = json.loads(bytes(buf[8 : 8 + n]))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"invalid JSON in header ({e})") from None
    if not isinstance(parsed, dict):
        raise ValueError("invalid JSON in header (not an object)")
    parsed.pop("__metadata__", None)
    entries = {}
    for name, info in parsed.items():
        try:
            dtype, shape, (begin, end) = _ST_DTYPES[info["dtype"]], list(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"invalid header entry for tensor {name!r} ({type(e).__name__}: {e})") from None
        if any(type(x) is not int or x < 0 for x in (*shape, begin, end)) or end < begin:
            raise ValueError(f"invalid offset or shape for tensor {name!r}: {info['data_offsets']}, {shape}")
        if 8 + n + end > size:
            raise ValueError(f"invalid offset for tensor {name!r}: it ends beyond the file's {size} bytes")
        numel = 1
        for x in shape:
            numel *= x
        if numel * dtype.itemsize != end - begin:
            raise ValueError(f"invalid shape for tensor {name!r}: {shape} does not fill its {end - begin} bytes")
        entries[name] = (dtype, shape, begin, end)
    covered = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if begin != covered:
            raise ValueError(f"invalid offset for tensor {name!r}: tensors must tile the data without gaps")
        covered = end
    if 8 + n + covered != size:
        raise ValueError(f"invalid offset: the tensors cover {covered} bytes of data, the file holds {size - 8 - n}")
    return 8 + n, entries


def views(data: bytes | bytearray | memoryview,
          expect: dict[str, tuple[torch.dtype, tuple[int, ...] | None]] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of ``data`` (no copy: they keep ``data`` alive).

    Validated like ``safetensors.torch.load`` (see ``header``); ``expect`` maps tensor name to (dtype, shape
    or None) and is enforced too.
    """
    start, entries = header(data)
    tensors = {name: tensor(data, dtype, shape, start + begin) for name, (dtype, shape, begin, _) in entries.items()}
    check(tensors, expect)
    return tensors


def tensor(data: bytes | bytearray | memoryview, dtype: torch.dtype, shape: list[int], offset: int = 0) -> torch.Tensor:
    """A view of ``data`` from ``offset`` as a tensor of ``dtype`` and ``shape`` (no copy)."""
    numel = 1
    for x in shape:
        numel *= x
    if numel == 0:
        return torch.empty(shape, dtype=dtype)  # frombuffer refuses empty tensors
    return torch.frombuffer(data, dtype=dtype, count=numel, offset=offset).view(shape)


def check(tensors: dict[str, torch.Tensor], expect: dict[str, tuple[torch.dtype, tuple[int, ...] | None]] | None
          ) -> None:
    """Raise ValueError unless every tensor ``expect`` names is there with its dtype and shape (None: any)."""
    for name, (dtype, shape) in (expect or {}).items():
        t = tensors.get(name)
        if t is None:
            raise ValueError(f"shard has no tensor {name!r} (has {sorted(tensors)})")
        if t.dtype != dtype or (shape is not None and tuple(t.shape) != tuple(shape)):
            raise ValueError(f"shard tensor {name!r} is {t.dtype}{list(t.shape)}, expected {dtype}{list(shape or [])}")


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


def stats(acts: torch.Tensor) -> dict[str, float | int]:
    """Mean L2 norm per token and NaN/Inf counts, for the manifest (computed in float32)."""
    flat = acts.reshape(-1, acts.shape[-1])
    # One pass, upcast on the fly: a NaN or Inf anywhere makes its row's norm non-finite, so all-finite
    # norms mean no NaN or Inf at all. Only otherwise (or on a float32 overflow) the full count below runs:
    # it is ~30x slower (90 ms per 8192 x 768 shard, competing with the forward pass for the CPU).
    norms = torch.linalg.vector_norm(flat, dim=-1, dtype=torch.float32)
    if bool(torch.isfinite(norms).all()):
        return {"mean_l2_norm": round(float(norms.mean()), 6) if len(norms) else 0.0, "nan": 0, "inf": 0}
    flat = flat.float()
    finite = torch.isfinite(flat)
    norms = torch.linalg.vector_norm(torch.where(finite, flat, 0.0), dim=-1)
    return {
        "mean_l2_norm": round(float(norms.mean()), 6) if len(norms) else 0.0,
        "nan": int(torch.isnan(flat).sum()),
        "inf": int(torch.isinf(flat).sum()),
    }
