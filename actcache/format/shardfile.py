"""A shard's safetensors file built in one host buffer, so that no copy of it is made on the way to the store.

The buffer holds the file itself: the 8-byte header length, the JSON header that ``safetensors.torch.save``
writes for the same tensors, then the tensor data, which the extractor fills batch by batch (cast to the
storage dtype as each batch lands) through the views in ``ShardFile.tensors``. ``shard.encode`` of the same
tensors gives the same bytes (tests/actcache/format/test_shardfile.py checks every dtype, codec and odd shapes), so
sets keep their bytes and ids.

The codecs work from the buffer (``encode``):
- ``none`` stores the buffer as it is;
- ``zstd`` compresses it in one call: zstd's one-shot mode splits blocks with look-ahead over the whole input,
  so a streaming compressor writes other (valid, different) bytes; the compressed copy is the one extra;
- ``shuffle-zstd`` byte-shuffles into a second buffer in bounded chunks, handing the first buffer's pages
  back to the OS as they are consumed, then compresses that in one call.

Pinned buffers (CUDA) are kept for the next shard: pinning is slow, and torch's pinned allocator rounds
every block up to a power of two. Pageable buffers go back to the OS as soon as they are released, so a
process holds only the shards in flight.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from dataclasses import dataclass

import torch

from actcache.extraction import memory
from actcache.format.shard import header_metadata

# safetensors' names for the dtypes a shard holds, in the order of its Dtype enum: it writes tensors by
# descending dtype, then by name (so float32 activations come before int32 tokens, float16 after them).
_ST_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32"}
_ST_ORDER = ("F16", "BF16", "I32", "F32")

SHUFFLE_CHUNK_BYTES = 8 << 20
"""Bytes byte-shuffled at a time (and handed back to the OS) for shuffle-zstd."""


def layout(
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """(8-byte length + JSON header, {name: (start, end) in the data after it}), as ``safetensors.torch.save``
    writes them for tensors of these dtypes and shapes. ``metadata`` as for ``shard.encode``."""
    names = sorted(specs, key=lambda n: (-_ST_ORDER.index(_ST_NAMES[specs[n][0]]), n))
    header: dict = {}
    meta = header_metadata(metadata)
    if meta:
        header["__metadata__"] = meta
    spans, offset = {}, 0
    for name in names:
        dtype, shape = specs[name]
        end = offset + dtype.itemsize * math.prod(shape)
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        spans[name], offset = (offset, end), end
    # serde_json's compact form (what safetensors writes), padded with spaces to 8 bytes.
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, spans


class _Pool:
    """Idle pinned buffers, for the next shard."""

    def __init__(self) -> None:
        self.idle: list[torch.Tensor] = []
        self.lock = threading.Lock()

    def take(self, nbytes: int, pinned: bool) -> torch.Tensor:
        if pinned:
            with self.lock:
                fits = [b for b in self.idle if b.numel() >= nbytes]
                if fits:
                    best = min(fits, key=torch.Tensor.numel)
                    self.idle.remove(best)
                    return best
                self.idle.clear()  # too small for this shard size: let them go rather than hold both
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)

    def give(self, buf: torch.Tensor, pinned: bool) -> None:
        if pinned:
            with self.lock:
                self.idle.append(buf)


POOL = _Pool()


class ShardFile:
    """One shard's safetensors file in one host buffer; ``tensors`` are views to fill in place."""

    def __init__(
        self,
        specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
        *,
        pinned: bool = False,
    ):
        head, spans = layout(specs, metadata)
        self.start = len(head)
        self.size = self.start + max((end for _, end in spans.values()), default=0)
        self.pinned = pinned
        self.source_finite = True
        """Whether the activations were all finite as computed, before the cast to the storage dtype."""
        self.itemsize = specs["activations"][0].itemsize if "activations" in specs else 1
        self.buffer: torch.Tensor | None = POOL.take(self.size, pinned)
        self.buffer[: self.start].copy_(torch.frombuffer(bytearray(head), dtype=torch.uint8))
        self.tensors = {
            name: self.buffer[self.start + a : self.start + b].view(specs[name][0]).view(specs[name][1])
            for name, (a, b) in spans.items()
        }

    def view(self) -> memoryview:
        """The file's bytes (no copy)."""
        if self.buffer is None:
            raise RuntimeError("shard file already released")
        return self.buffer[: self.size].numpy().data

    def release(self) -> None:
        """Done with the bytes: a pinned buffer waits for the next shard, a pageable one goes back to the OS."""
        buf, self.buffer, self.tensors = self.buffer, None, {}
        if buf is not None:
            POOL.give(buf, self.pinned)

    def shuffled(self) -> torch.Tensor:
        """The file with its tensor data byte-shuffled (``shard.shuffle``), built chunk by chunk; a pageable
        buffer's pages are handed back as they are consumed, so this file is released afterwards."""
        src = self.buffer
        if src is None:
            raise RuntimeError("shard file already released")
        k, start = self.itemsize, self.start
        n = (self.size - start) // k
        out = torch.empty(self.size, dtype=torch.uint8)
        out[:start] = src[:start]
        end = start + n * k
        out[end : self.size] = src[end : self.size]  # the last len % itemsize bytes stay as they are
        planes = out[start:end].view(k, n)
        rows = src[start:end].view(n, k)
        step = max(1, SHUFFLE_CHUNK_BYTES // k)
        for r in range(0, n, step):
            planes[:, r : r + step].copy_(rows[r : r + step].T)
            if not self.pinned:  # a pinned buffer is reused, not given back
                memory.discard(src, start + r * k, start + min(n, r + step) * k)
        self.release()
        return out


@dataclass
class Payload:
    """The bytes a shard is stored as, and what the completion record says of them."""

    data: memoryview
    raw_bytes: int
    """Size of the safetensors file before the codec."""
    sha256: str
    owner: ShardFile | None = None
    """The shard file the bytes live in (codec none), released with the payload."""

    def release(self) -> None:
        self.data = memoryview(b"")
        if self.owner is not None:
            self.owner.release()
            self.owner = None


def encode(f: ShardFile, *, codec: str = "none", level: int = 0) -> Payload:
    """Apply the codec to a filled shard file (``shard.encode``'s bytes); the file is released unless it is
    the payload itself (codec none)."""
    if codec == "none":
        data = f.view()
        return Payload(data, f.size, hashlib.sha256(data).hexdigest(), owner=f)
    if codec not in ("zstd", "shuffle-zstd"):
        raise ValueError(f"unknown codec {codec!r}")
    import zstandard

    raw = f.size
    if codec == "zstd":
        packed = zstandard.ZstdCompressor(level=level).compress(f.view())
        f.release()
    else:
        shuffled = f.shuffled()
        packed = zstandard.ZstdCompressor(level=level).compress(shuffled.numpy().data)
        del shuffled
    return Payload(memoryview(packed), raw, hashlib.sha256(packed).hexdigest())
