"""Tokenize and pack text into fixed-length sequences, cached as token shards in the store.

The token cache has its own key (dataset + tokenizer + tokenization settings), so other hooks, layers
and models sharing the tokenizer reuse it. Sequences are deterministic: documents in source order,
each followed by the separator, chunked to exactly ``context_size`` (BOS first when asked).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from actcache import faults, layout, records
from actcache.key import TokensKey
from actcache.store import Store

if TYPE_CHECKING:
    import torch

INDEX = "index.json"


@dataclass(frozen=True)
class ShardWork:
    """One shard to compute: its index and how many sequences it holds."""

    index: int
    n_seq: int


def shard_sizes(total_seqs: int, seqs_per_shard: int) -> list[int]:
    """Sequences in each shard: all full but possibly the last."""
    full, rest = divmod(total_seqs, seqs_per_shard)
    return [seqs_per_shard] * full + ([rest] if rest else [])


def pack(docs: Iterable[list[int]], *, context_size: int, bos: int | None, separator: int | None,
         prepend_bos: bool) -> Iterator[list[int]]:
    """Concatenate token lists (each followed by ``separator``) and cut sequences of exactly ``context_size``."""
    body = context_size - 1 if prepend_bos else context_size
    head = [bos] if prepend_bos else []
    buf: list[int] = []
    start = 0
    for ids in docs:
        buf.extend(ids)
        if separator is not None:
            buf.append(separator)
        while len(buf) - start >= body:
            yield head + buf[start : start + body]
            start += body
        if start > 1 << 16:  # compact now and then instead of slicing on every sequence
            buf, start = buf[start:], 0


def tokenize_docs(texts: Iterable[str], tokenizer, batch: int = 256) -> Iterator[list[int]]:
    chunk: list[str] = []
    for t in texts:
        chunk.append(t)
        if len(chunk) == batch:
            yield from tokenizer(chunk, add_special_tokens=False)["input_ids"]
            chunk = []
    if chunk:
        yield from tokenizer(chunk, add_special_tokens=False)["input_ids"]


class TokenCache:
    """Token shards for one TokensKey inside a store."""

    def __init__(self, store: Store, key: TokensKey):
        self.store, self.key = store, key
        self.root = layout.tokens_dir(key.id)

    def scan(self) -> records.Scan:
        return records.scan(self.store, self.root, INDEX)

    def available_seqs(self, scan: records.Scan) -> int | None:
        """Total sequences the dataset holds, once a pass has reached its end."""
        if layout.END not in scan.entries:
            return None
        return int(self.store.read_json(f"{self.root}/{layout.END}")["n_seq"])

    def plan(self, target_seqs: int, scan: records.Scan | None = None) -> list[ShardWork]:
        scan = scan or self.scan()
        avail = self.available_seqs(scan)
        total = target_seqs if avail is None else min(target_seqs, avail)
        return [ShardWork(i, n) for i, n in enumerate(shard_sizes(total, self.key.seqs_per_shard))]

    def ensure(self, target_seqs: int, texts: Iterable[str], tokenizer, sep: int | None, bos: int | None,
               on_shard=None) -> list[ShardWork]:
        """Make sure token shards exist up to ``target_seqs``; return the true per-shard sizes."""
        scan = self.scan()
        wanted = self.plan(target_seqs, scan)
        if all(scan.is_done(w.index, w.n_seq) for w in wanted):
            return wanted
        self.store.sweep_temp(self.root)
        k = self.key
        seqs = pack(tokenize_docs(texts, tokenizer), context_size=k.context_size, bos=bos, separator=sep,
                    prepend_bos=k.prepend_bos)
        out: list[ShardWork] = []
        batch: list[list[int]] = []
        produced = 0
        for seq in seqs:
            batch.append(seq)
            produced += 1
            if len(batch) == k.seqs_per_shard or produced == target_seqs:
                out.append(self._emit(scan, len(out), batch))
                if on_shard:
                    on_shard()
                batch = []
            if produced == target_seqs:
                break
        else:
            if batch:
                out.append(self._emit(scan, len(out), batch))
            self.store.write_json(f"{self.root}/{layout.END}", {"n_seq": produced})
        recs = self.scan().sorted_records()
        self.store.write_json(f"{self.root}/{INDEX}", {"key": k.id, "shards": [r.to_dict() for r in recs]})
        return out

    def _emit(self, scan: records.Scan, index: int, seqs: list[list[int]]) -> ShardWork:
        work = ShardWork(index, len(seqs))
        if not scan.is_done(index, work.n_seq):
            import torch

            from actcache import shard

            enc = shard.encode({"tokens": torch.tensor(seqs, dtype=torch.int32)})
            rel = layout.shard_file(index, "none")
            self.store.write_bytes(f"{self.root}/{rel}", enc.data)
            faults.point("tokenize.token-shard-written")
            records.write_record(self.store, self.root, records.Record(
                index, rel, work.n_seq, work.n_seq * self.key.context_size, enc.sha256, len(enc.data)))
            faults.point("tokenize.token-record-written")
        return work

    def load(self, index: int) -> torch.Tensor:
        import torch

        from actcache import shard

        data = self.store.read_bytes(f"{self.root}/{layout.shard_file(index, 'none')}")
        return shard.decode(data, codec="none", expect={"tokens": (torch.int32, None)})["tokens"]
