"""The shard format: a plain safetensors file (optionally compressed) holding ``activations`` and ``tokens``.

Any safetensors reader opens an uncompressed shard with no actcache code. Reading never unpickles:
safetensors validates its own header offsets, and ``decode`` checks names, dtypes and shapes.

Codecs: ``zstd`` is one zstd frame of the safetensors file. ``shuffle-zstd`` first byte-shuffles the tensor
data (everything after the header, which stays readable) with the element size of ``activations``: all
first bytes of every element, then all second bytes, ... Activations' sign/exponent bytes are far more
alike than their low mantissa bytes, so zstd finds more to share (bench/RESULTS.md, "Compression"). To undo
it without actcache: zstd -d, then for the data after byte 8 + header length,
``np.frombuffer(body, np.uint8).reshape(itemsize, -1).T.tobytes()`` (plus the trailing len % itemsize bytes).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import save as st_save

from actcache.format.header import HEADER_ALLOWANCE, ITEMSIZE, Expect, check_entries, itemsize, parse, read_exact
from actcache.format.header import check_header as check_header  # lives there: verify checks without torch
from actcache.orchestration.logs import run_logger

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


def encode(
    tensors: dict[str, torch.Tensor], *, codec: str = "none", level: int = 0, metadata: dict[str, str] | None = None
) -> Encoded:
    """The reference encoder (token shards use it; ``shardfile`` writes the same bytes without the copies)."""
    raw = st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=header_metadata(metadata))
    data = raw
    if codec in ("zstd", "shuffle-zstd"):
        import zstandard

        data = zstandard.ZstdCompressor(level=level).compress(shuffle(raw) if codec == "shuffle-zstd" else raw)
    elif codec != "none":
        raise ValueError(f"unknown codec {codec!r}")
    return Encoded(data, len(raw), hashlib.sha256(data).hexdigest())


def decode(data: bytes, *, codec: str, expect: Expect | None = None, cap: int | None = None) -> dict[str, torch.Tensor]:
    """Decode shard bytes; ``expect`` maps tensor name to (dtype, shape or None) and is enforced.

    With every shape given (as readers of a set do, from its key and manifest), the safetensors header is checked
    against ``expect`` before any tensor data is decompressed or loaded, and decompression stops at exactly the
    bytes those tensors fill: a crafted file or frame cannot make this allocate more than a true shard's size.
    ``cap``: the most bytes a zstd shard may inflate to, where the set's key says (``ActivationSet.shard_cap``);
    None: ``inflation_cap`` of its stored size.
    """
    bounded = expect if expect and all(shape is not None for _, shape in expect.values()) else None
    if codec in ("zstd", "shuffle-zstd"):
        raw = _decompress_bounded(data, bounded, cap) if bounded else _decompress(data, cap)
        return views(unshuffle(raw) if codec == "shuffle-zstd" else raw, expect)
    if codec != "none":
        raise ValueError(f"unknown codec {codec!r}")
    if bounded:
        check_entries(parse(data, data[:8]), bounded)
    # Tensors are views of their buffer, and a tensor may be written to: a read-only one (bytes from an object
    # store, or from ``read_bytes``) is copied once, after the checks above; a local mapping (``read_mapped``,
    # copy-on-write) is viewed as it is.
    return views(bytearray(data) if memoryview(data).readonly else data, expect)


_TORCH_OF = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "U8": torch.uint8,
    "I8": torch.int8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100_000_000  # safetensors' own limit


def header(
    data: bytes | bytearray | memoryview, size: int | None = None
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
            dtype, shape, (begin, end) = _TORCH_OF[info["dtype"]], list(info["shape"]), info["data_offsets"]
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


def views(data: bytes | bytearray | memoryview, expect: Expect | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of ``data`` (no copy: they keep ``data`` alive).

    Validated like ``safetensors.torch.load`` (see ``header``); ``expect`` maps tensor name to (dtype, shape
    or None) and is enforced too.
    """
    start, entries = header(data)
    tensors = {name: tensor(data, dtype, shape, start + begin) for name, (dtype, shape, begin, _) in entries.items()}
    check(tensors, expect)
    return tensors


def tensor(data: bytes | bytearray | memoryview, dtype: torch.dtype, shape: list[int], offset: int = 0) -> torch.Tensor:
    """A view of ``data`` from ``offset`` as a tensor of ``dtype`` and ``shape`` (no copy, unless ``data`` is
    read-only: then a copy of those bytes alone)."""
    numel = 1
    for x in shape:
        numel *= x
    if numel == 0:
        return torch.empty(shape, dtype=dtype)  # frombuffer refuses empty tensors
    if memoryview(data).readonly:  # bytes (a ranged read): a tensor may be written to, so it gets its own copy
        data, offset = bytearray(memoryview(data)[offset : offset + numel * dtype.itemsize]), 0
    return torch.frombuffer(data, dtype=dtype, count=numel, offset=offset).view(shape)


def check(tensors: dict[str, torch.Tensor], expect: Expect | None) -> None:
    """Raise ValueError unless every tensor ``expect`` names is there with its dtype and shape (None: any)."""
    for name, (dtype, shape) in (expect or {}).items():
        t = tensors.get(name)
        if t is None:
            raise ValueError(f"shard has no tensor {name!r} (has {sorted(tensors)})")
        if t.dtype != dtype or (shape is not None and tuple(t.shape) != tuple(shape)):
            raise ValueError(f"shard tensor {name!r} is {t.dtype}{list(t.shape)}, expected {dtype}{list(shape or [])}")


TEXT_VALUE_LIMIT = 64 << 10
"""Bytes (UTF-8) of one kept text value (``--keep-columns`` of strings, one per example): extraction refuses a longer
one, and a reader counts on it, so a shard's text is bounded by its key (``seqs_per_shard`` examples times its kept
columns) and this constant, not by what a forged shard stores."""

FREE_INFLATION = 64 << 20
"""Bytes a zstd shard may always inflate to, however small it is stored."""
MAX_INFLATION = 32
"""Where a set's key vouches for no width (``format.width``: a hub model not in the local cache, a set written
before manifests carried the model's config), a zstd shard may inflate above ``FREE_INFLATION`` to at most this many
times its stored size (the environment variable ``ACTCACHE_MAX_INFLATION`` raises it). Activations are floats whose
low bytes are noise: real shards compress 1.1-2x. A manifest's ``d`` can be resealed by anyone who hands you a set,
so without the key's word the width it states bounds nothing; what a shard really is stored as does."""


def inflation_cap(stored: int) -> int:
    """The most bytes a zstd shard stored in ``stored`` bytes may inflate to (see ``MAX_INFLATION``)."""
    try:
        ratio = max(1, int(os.environ.get("ACTCACHE_MAX_INFLATION", MAX_INFLATION)))
    except ValueError:
        ratio = MAX_INFLATION
    return max(FREE_INFLATION, ratio * stored)


def _check_inflation(size: int, stored: int, key_cap: int | None = None) -> None:
    if key_cap is not None:
        if size > key_cap:
            raise ValueError(
                f"zstd frame of {stored} bytes inflates to {size} bytes, more than a true shard of the set's key "
                f"({key_cap} bytes): a decompression bomb"
            )
        return
    cap = inflation_cap(stored)
    if size > cap:
        raise ValueError(
            f"zstd frame of {stored} bytes inflates to {size} bytes, {size // max(stored, 1)} times its size: a "
            f"decompression bomb (a true shard compresses far less; at most {cap} bytes are read from it, "
            "ACTCACHE_MAX_INFLATION raises the bound)"
        )


def _decompress_bounded(data: bytes, expect: Expect, key_cap: int | None = None) -> bytearray:
    """Decompress a shard's zstd frame header first: the header is checked against ``expect`` before the data,
    and exactly the bytes it then promises are read (a frame claiming or inflating to more is refused), and
    never more than ``key_cap`` (else ``inflation_cap`` of the stored size)."""
    import zstandard

    limit = 8 + HEADER_ALLOWANCE + sum(itemsize(dtype) * math.prod(shape or []) for dtype, shape in expect.values())
    try:
        declared = zstandard.frame_content_size(data)
        if declared > limit:  # -1 when the frame does not say
            raise ValueError(f"zstd frame declares {declared} bytes, more than the expected tensors fill ({limit})")
        _check_inflation(declared, len(data), key_cap)
        with zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=False) as reader:
            head = read_exact(reader, 8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            if len(head) < 8 or n > HEADER_ALLOWANCE:
                raise ValueError(
                    f"safetensors header too large ({n} bytes)" if len(head) == 8 else "safetensors header too small"
                )
            head += read_exact(reader, n)
            body_size = check_entries(parse(head, head), expect)
            total = len(head) + body_size
            _check_inflation(total, len(data), key_cap)  # before any tensor data is read: the header's word is enough
            if declared not in (-1, total):
                raise ValueError(f"zstd frame declares {declared} bytes, the shard's header {total}")
            out = bytearray(total)  # writable (tensors are views of it) and filled in place: no copy of the data
            out[: len(head)] = head
            got, view = len(head), memoryview(out)
            while got < total and (k := reader.readinto(view[got:])):
                got += k
            if got != total or reader.read(1):
                raise ValueError(f"zstd frame does not hold exactly the {total} bytes its header promises")
    except zstandard.ZstdError as e:
        raise ValueError(f"not a valid zstd frame ({e})") from e
    return out


def _decompress(data: bytes, key_cap: int | None = None) -> bytearray:
    """Without expected shapes (an example set's vary): at most ``key_cap`` (else ``inflation_cap``) bytes are read."""
    import zstandard

    cap = inflation_cap(len(data)) if key_cap is None else key_cap
    try:
        declared = zstandard.frame_content_size(data)
        _check_inflation(declared, len(data), key_cap)
        with zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=False) as reader:
            parts, got = [], 0
            while chunk := reader.read(min(1 << 20, cap + 1 - got)):
                parts.append(chunk)
                got += len(chunk)
                if got > cap:
                    _check_inflation(got, len(data), key_cap)
            out = bytearray().join(parts)  # writable: the tensors made from it are views
    except zstandard.ZstdError as e:
        raise ValueError(f"not a valid zstd frame ({e})") from e
    return out


def _split(raw: bytes | bytearray) -> tuple[int, int]:
    """(offset where tensor data starts, element size of ``activations``) from a safetensors header."""
    if len(raw) < 8:
        raise ValueError("shard too short for a safetensors header")
    start = 8 + int.from_bytes(raw[:8], "little")
    if start > len(raw) or start - 8 > HEADER_ALLOWANCE:
        raise ValueError("safetensors header length out of range")
    try:
        header = json.loads(raw[8:start])
        width = ITEMSIZE[header["activations"]["dtype"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"shard header has no readable activations dtype ({type(e).__name__})") from None
    return start, width


def _transpose(raw: bytes | bytearray, forward: bool) -> bytearray:
    """``raw`` with its tensor data transposed, written in place into one new (writable) buffer."""
    start, width = _split(raw)
    body = np.frombuffer(raw, np.uint8, offset=start)
    n = len(body) // width * width
    shape = (-1, width) if forward else (width, -1)
    out = bytearray(len(raw))
    out[:start] = raw[:start]
    dst = np.frombuffer(out, np.uint8, offset=start)
    dst[:n].reshape(shape[::-1])[...] = body[:n].reshape(shape).T
    dst[n:] = body[n:]
    return out


def shuffle(raw: bytes | bytearray) -> bytearray:
    """Byte-shuffle a safetensors file's tensor data by the element size of ``activations``; header untouched."""
    return _transpose(raw, forward=True)


def unshuffle(data: bytes | bytearray) -> bytearray:
    return _transpose(data, forward=False)


STATS_CHUNK_BYTES = 1 << 20
"""float32 scratch for the stats: rows are upcast this much at a time, not the whole shard at once. Small: a
larger scratch, allocated on a pool thread beside the forward pass's batches, fragments glibc's heaps
(bench/RESULTS.md, "Memory at real widths")."""


def stats(acts: torch.Tensor) -> dict[str, float | int | None]:
    """Mean L2 norm per token (of the finite values) and NaN/Inf counts, for the manifest: always finite JSON."""
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
    # A NaN or Inf somewhere (or float32 squares that overflow, from |x| ~ 1.8e19 on): per chunk in float64,
    # which holds any float32's square.
    step = max(1, STATS_CHUNK_BYTES // (8 * max(1, flat.shape[-1])))
    norms64 = torch.empty(len(flat), dtype=torch.float64)
    nan = inf = 0
    for i in range(0, len(flat), step):
        part = flat[i : i + step].double()
        finite = torch.isfinite(part)
        norms64[i : i + step] = torch.linalg.vector_norm(torch.where(finite, part, 0.0), dim=-1)
        nan += int(torch.isnan(part).sum())
        inf += int(torch.isinf(part).sum())
    mean = float(norms64.mean()) if len(norms64) else 0.0
    return {"mean_l2_norm": round(mean, 6) if math.isfinite(mean) else None, "nan": nan, "inf": inf}


_WARNED: dict[str, int] = {}
WARN_SHARDS = 3
"""Shards per set warned about in a process; the manifest, ls, show, verify and the summary count them all."""


def warn_non_finite(stats: dict, source_finite: bool, dtype: str, set_id: str, where: str) -> bool:
    """Warn (in the run's log) that ``where`` holds NaN/Inf and what to do; return ``source_finite`` (whether
    the activations were finite before the cast to ``dtype``, i.e. whether the storage dtype overflowed)."""
    n = _WARNED[set_id] = _WARNED.get(set_id, 0) + 1
    if n > WARN_SHARDS:
        return source_finite
    logger = run_logger()
    more = " (further shards are counted, not reported: see `actcache verify`)" if n == WARN_SHARDS else ""
    logger.warning(
        "%s holds %d Inf and %d NaN values: %s%s",
        where,
        stats["inf"],
        stats["nan"],
        non_finite_hint(dtype, source_finite),
        more,
    )
    return source_finite


def non_finite_hint(dtype: str, source_finite: bool) -> str:
    """What to do about NaN/Inf in a set stored as ``dtype`` (``source_finite``: the model's output had none)."""
    if source_finite and dtype == "float16":
        return "float16 overflowed (its largest value is 65504): extract again with --dtype bfloat16 or float32"
    if source_finite:
        return f"{dtype} overflowed: extract again with --dtype float32"
    return "the model itself produced them: check --model-dtype (float32 is safest) and the model's weights"
