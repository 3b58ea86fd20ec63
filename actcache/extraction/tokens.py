"""Tokenize and pack text into fixed-length sequences, cached as token shards in the store.

The token cache has its own key (dataset + tokenizer + tokenization settings), so other hooks, layers
and models sharing the tokenizer reuse it. Sequences are deterministic: documents in source order,
each followed by the separator, chunked to exactly ``context_size`` (BOS first when asked).
"""

from __future__ import annotations

import contextlib
import hashlib
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from actcache import crashpoints
from actcache.errors import ActcacheError, Failure, opt
from actcache.format import layout, records
from actcache.format.key import TokensKey
from actcache.storage.store import Store

if TYPE_CHECKING:
    import torch

    from actcache.inputs.model import ResolvedModel

INDEX = layout.TOKEN_INDEX


@dataclass(frozen=True)
class ShardWork:
    """One shard to compute: its index and how many sequences it holds."""

    index: int
    n_seq: int


@dataclass(frozen=True)
class ShardRange(Sequence[ShardWork]):
    """The shards that ``total_seqs`` sequences fill, all full but possibly the last, made when asked for: before
    the dataset's end is known a plan names every shard of the target, and --max-tokens 10^12 names millions."""

    total_seqs: int
    seqs_per_shard: int
    known: bool = field(default=True, compare=False)
    """Whether ``total_seqs`` is certain: stored token shards fill it, or it stops where the data is known to end
    (False: the target's, at most)."""

    def __len__(self) -> int:
        return -(-self.total_seqs // self.seqs_per_shard)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        n, i = len(self), operator.index(i)
        if not -n <= i < n:
            raise IndexError(f"shard {i} of {n}")
        i %= n
        return ShardWork(i, min(self.seqs_per_shard, self.total_seqs - i * self.seqs_per_shard))

    def __iter__(self) -> Iterator[ShardWork]:
        return (self[i] for i in range(len(self)))

    def __contains__(self, w: object) -> bool:
        return isinstance(w, ShardWork) and 0 <= w.index < len(self) and self[w.index] == w


def pack(
    docs: Iterable[list[int]], *, context_size: int, bos: int | None, separator: int | None, prepend_bos: bool
) -> Iterator[list[int]]:
    """Concatenate token lists (each followed by ``separator``) and cut sequences of exactly ``context_size``.

    A document with no token (a text that tokenizes to nothing) is skipped, separator and all, as an empty list of
    ``--token-column`` ids and a missing text are: the same ids give the same sequences, read either way."""
    body = context_size - 1 if prepend_bos else context_size
    head: list[Any] = [bos] if prepend_bos else []
    buf: list[int] = []
    start = 0
    empty = True  # the document under way has no token yet (its ``Part``s included)
    for ids in docs:
        buf.extend(ids)
        empty = empty and not ids
        if not isinstance(ids, Part):
            if separator is not None and not empty:
                buf.append(separator)
            empty = True
        while len(buf) - start >= body:
            yield head + buf[start : start + body]
            start += body
        if start > 1 << 16:  # compact now and then instead of slicing on every sequence
            buf, start = buf[start:], 0


class Part(list):
    """Token ids of a document that goes on in the next item (``pack`` puts no separator after it)."""


WINDOW_CHARS = 1 << 17
"""Characters of one document tokenized in one call: a tokenizer needs ~150 bytes per character of a call (a 20 MB
line cost 3 GB in one), so a longer document is tokenized in windows (``long_document``)."""
OVERLAP_CHARS = 1 << 13
"""Characters two neighbouring windows share; their tokens must agree inside it."""
AGREE_TOKENS = 32
"""Consecutive tokens (ids and offsets) two windows must share where the second takes over."""
BATCH_CHARS = 1 << 20
"""Characters of short documents tokenized in one call (a batch of 256 documents ends earlier at this size)."""


def tokenize_docs(texts: Iterable[str], tokenizer, batch: int = 256, *, whole: bool = True) -> Iterator[list[int]]:
    """Each text's token ids, in order. A text longer than ``WINDOW_CHARS`` is tokenized in windows; with
    ``whole=False`` it comes as several items, all but its last a ``Part`` (``pack`` takes them so, and holds no
    whole document)."""
    chunk: list[str] = []
    chars = 0
    for t in texts:
        if len(t) > WINDOW_CHARS:
            if chunk:
                yield from _encode(tokenizer, chunk)
                chunk, chars = [], 0
            if whole:
                yield [i for part in long_document(tokenizer, t) for i in part]
            else:
                yield from long_document(tokenizer, t)
            continue
        chunk.append(t)
        chars += len(t)
        if len(chunk) == batch or chars >= BATCH_CHARS:
            yield from _encode(tokenizer, chunk)
            chunk, chars = [], 0
    if chunk:
        yield from _encode(tokenizer, chunk)


def _encode(tokenizer, chunk: list[str]) -> list[list[int]]:
    try:
        return tokenizer(chunk, add_special_tokens=False)["input_ids"]
    except Exception as e:  # texts are checked to be strings: this is the tokenizer's own failure
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ActcacheError(f"the tokenizer failed on a document ({type(e).__name__}: {first})") from e


def _window(tokenizer, text: str, start: int, end: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text[start:end]`` and their character spans in ``text``."""
    try:
        enc = tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise  # a slow tokenizer: ``long_document`` takes one call
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ActcacheError(f"the tokenizer failed on a document ({type(e).__name__}: {first})") from e
    return list(enc["input_ids"]), [(a + start, b + start) for a, b in enc["offset_mapping"]]


def long_document(tokenizer, text: str) -> Iterator[list[int]]:
    """The token ids of one long ``text``, equal to one call's, a window of ``WINDOW_CHARS`` at a time.

    A window's tokens are off only near where it cuts the text (a word cut in two; a tokenizer's start-of-text
    space). Each next window starts ``OVERLAP_CHARS`` before the previous one ends, and takes over at the first
    token where the two agree on ``AGREE_TOKENS`` tokens in a row, ids and spans: there neither cut reaches.
    Where they never agree (a tokenizer whose merges reach further than the overlap) the rest of the text is
    tokenized in one call instead, which is exact and unbounded. Slow tokenizers (no offsets) take one call.
    Yields ``Part``s, then a plain list (the document's end)."""
    n = len(text)
    try:
        ids, spans = _window(tokenizer, text, 0, min(n, WINDOW_CHARS))
    except NotImplementedError:  # a slow (Python) tokenizer has no offsets
        yield _encode(tokenizer, [text])[0]
        return
    done, end, emitted = 0, min(n, WINDOW_CHARS), 0
    while end < n:
        start = end - OVERLAP_CHARS
        nids, nspans = _window(tokenizer, text, start, min(n, start + WINDOW_CHARS))
        at = _takeover(ids, spans, done, nids, nspans)
        if at is None:
            yield _encode(tokenizer, [text])[0][emitted:]  # emitted tokens are the one call's first ones
            return
        i, j = at
        yield Part(ids[done:i])
        emitted += i - done
        ids, spans, done, end = nids, nspans, j, min(n, start + WINDOW_CHARS)
    yield ids[done:]


def _takeover(
    ids: list[int], spans: list[tuple[int, int]], done: int, nids: list[int], nspans: list[tuple[int, int]]
) -> tuple[int, int] | None:
    """(i, j): token i of the previous window is token j of the next, and the ``AGREE_TOKENS`` from there agree."""
    where: dict[int, int] = {}
    for i in range(done, len(ids)):
        where.setdefault(spans[i][0], i)
    for j in range(1, len(nids) - AGREE_TOKENS + 1):  # the next window's first token may be a cut word
        k = where.get(nspans[j][0])
        if k is None or k + AGREE_TOKENS >= len(ids):  # the previous window's last token may be a cut word
            continue
        if ids[k : k + AGREE_TOKENS] == nids[j : j + AGREE_TOKENS] and (
            spans[k : k + AGREE_TOKENS] == nspans[j : j + AGREE_TOKENS]
        ):
            return k, j
    return None


BUFFER_TOKENS = 1 << 24
"""Token ids (64 MB as int32) the validating pass keeps for writing; a larger target is tokenized twice."""


class TokenCache:
    """Token shards for one TokensKey inside a store.

    Token shards are full (``seqs_per_shard`` sequences) except where the dataset ends, whatever the target: a
    token shard's bytes depend on its key and index alone, so runs with different --max-tokens share them
    (even at once), and an activation shard of n sequences uses the first n of its token shard.
    """

    def __init__(self, store: Store, key: TokensKey, vocab_size: int | None = None, model: ResolvedModel | None = None):
        self.store, self.key = store, key
        self.vocab_size = vocab_size
        """The tokenizer's ids run 0..vocab_size-1: a stored id outside is damage (None: not checked)."""
        self.model = model
        """The model the ids are fed to: an id it has no embedding for is refused (the key holds the tokenizer,
        not the model: a cache may come from a run of another model with the same tokenizer)."""
        self.root = layout.tokens_dir(key.id)
        self.bounds = records.Bounds.of(key)

    def scan(self, *, read_all: bool = False) -> records.Scan:
        return records.scan(self.store, self.root, INDEX, self.bounds, owner=self.key.id, read_all=read_all)

    def available_seqs(self, scan: records.Scan) -> int | None:
        """Total sequences the dataset holds, once a pass has reached its end (None if unknown or damaged)."""
        if layout.END not in scan.entries:
            return None
        try:
            end = records.check_sealed(
                self.store.read_json(f"{self.root}/{layout.END}", limit=self.bounds.record_limit), layout.END
            )
        except (ValueError, FileNotFoundError):
            return None  # damaged: the next pass that reaches the end rewrites it
        n = end.get("n_seq")
        return n if type(n) is int and n >= 0 else None

    def plan(self, target_seqs: int, scan: records.Scan | None = None) -> ShardRange:
        """The activation shards for ``target_seqs`` sequences (the last may be partial)."""
        scan = scan or self.scan()
        avail = self.available_seqs(scan)
        if avail is not None:
            return ShardRange(min(target_seqs, avail), self.key.seqs_per_shard)
        n = len(ShardRange(target_seqs, self.key.seqs_per_shard))
        # The target is certain once token shards fill it (they are full but the data's last).
        known = n <= len(scan.records) and all(i in scan.records for i in range(n))
        return ShardRange(target_seqs, self.key.seqs_per_shard, known)

    def cover(self, wanted: ShardRange, avail: int | None) -> ShardRange:
        """The token shards ``wanted`` reads: full ones, except the dataset's last (when known)."""
        sps = self.key.seqs_per_shard
        return ShardRange(len(wanted) * sps if avail is None else min(len(wanted) * sps, avail), sps)

    def digest(self, shards: Iterable[ShardWork], scan: records.Scan | None = None) -> str | None:
        """The token ids ``shards`` read, as a digest of their token shards' checksums (recorded with the cache) and
        the sequences each activation shard takes: equal for the same ids however they were read (text or
        ``--token-column``). None unless all are stored."""
        recs = (scan or self.scan()).records
        h = hashlib.sha256()
        for w in shards:
            r = recs.get(w.index)
            if r is None or r.n_seq < w.n_seq:
                return None
            h.update(f"{w.index}:{w.n_seq}:{r.sha256};".encode())
        return h.hexdigest()

    def first_digest(self, scan: records.Scan | None = None) -> str | None:
        """The first token shard's checksum, as a family's digest (``content.family_id``); None if not stored."""
        r = (scan or self.scan()).records.get(0)
        return None if r is None else f"0:{r.sha256}"

    def ensure(
        self,
        target_seqs: int,
        texts: Callable[[], Iterable[Any]],
        tokenizer,
        sep: int | None,
        bos: int | None,
        *,
        check: Callable[[int], bool] | None = None,
        on_shard=None,
    ) -> ShardRange:
        """Make sure sound token shards exist up to ``target_seqs``; return the true activation shard sizes.

        ``tokenizer`` None: ``texts`` yields each document's token ids already (``--token-column``), packed exactly
        as the same ids tokenized from text would be.

        ``check(index)``: whether token shard ``index`` is re-hashed before it is trusted (those the run feeds to
        the model); None re-hashes every one (--verify-existing).
        """
        import torch  # here, not at the top: a plan (listing what is done) needs no torch

        scan = self.scan(read_all=check is None)
        wanted = self.plan(target_seqs, scan)
        cover = self.cover(wanted, self.available_seqs(scan))
        sound = {w.index for w in scan.done_of(cover, verify=True if check is None else check)}
        if len(sound) == len(cover):
            return wanted
        # Read, decode and tokenize exactly the input this run consumes before writing anything: a bad row or an
        # undecodable byte deep in a file then fails the run with the store untouched (a one-line error, exit 2).
        # Tokenizing costs little next to the forward passes it feeds; up to BUFFER_TOKENS the ids are kept, so
        # only larger targets tokenize twice.
        goal = len(cover) * self.key.seqs_per_shard
        kept: list[torch.Tensor] | None = []
        produced = 0
        for batch in self._shards(texts(), tokenizer, sep, bos, goal):
            if self.model is not None:
                self.model.check_embedded(max(map(max, batch)), "a token of the dataset's text")
            produced += len(batch)
            if kept is not None and produced * self.key.context_size <= BUFFER_TOKENS:
                kept.append(torch.tensor(batch, dtype=torch.int32))
            else:
                kept = None
        if produced == 0:
            raise ActcacheError(
                f"the dataset holds too little text for one sequence; lower {opt('context_size')} or pass more text"
            )
        self.store.sweep_temp(self.root)
        batches = (
            kept
            if kept is not None
            else (torch.tensor(b, dtype=torch.int32) for b in self._shards(texts(), tokenizer, sep, bos, goal))
        )
        for index, seqs in enumerate(batches):
            if index not in sound:
                self._write(index, seqs)
            if on_shard:
                on_shard()
        if produced < goal:  # the dataset ended first: remember where
            self.store.write_json(f"{self.root}/{layout.END}", records.sealed({"n_seq": produced}))
        recs = self.scan().sorted_records()
        self.store.write_json(
            f"{self.root}/{INDEX}", records.sealed({"key": self.key.id, "shards": [r.to_dict() for r in recs]})
        )
        return ShardRange(min(target_seqs, produced), self.key.seqs_per_shard)

    def _shards(
        self, texts: Iterable[Any], tokenizer, sep: int | None, bos: int | None, goal: int
    ) -> Iterator[list[list[int]]]:
        """The token shards' sequences in order, up to ``goal`` sequences or the end of the data."""
        k = self.key
        seqs = pack(
            texts if tokenizer is None else tokenize_docs(texts, tokenizer, whole=False),
            context_size=k.context_size,
            bos=bos,
            separator=sep,
            prepend_bos=k.prepend_bos,
        )
        batch: list[list[int]] = []
        produced = 0
        for seq in seqs:
            batch.append(seq)
            produced += 1
            if len(batch) == k.seqs_per_shard or produced == goal:
                yield batch
                batch = []
            if produced == goal:
                return
        if batch:
            yield batch

    def _write(self, index: int, seqs: torch.Tensor) -> None:
        from actcache.format import shard

        enc = shard.encode({"tokens": seqs})
        rel = layout.shard_file(index, "none")
        self.store.write_bytes(f"{self.root}/{rel}", enc.data)
        crashpoints.point("tokenize.token-shard-written")
        records.write_record(
            self.store,
            self.root,
            records.Record(index, rel, len(seqs), len(seqs) * self.key.context_size, enc.sha256, len(enc.data)),
        )
        crashpoints.point("tokenize.token-record-written")

    def load(self, index: int, n_seq: int) -> torch.Tensor:
        """The first ``n_seq`` sequences of token shard ``index``, checked against its record's sha256 first."""
        import torch

        from actcache.format import shard

        where = f"token shard {index} of {self.store.url_of(self.root)}"
        rel = layout.record_file(index)
        try:
            rec = records.Record.from_dict(
                records.check_sealed(self.store.read_json(f"{self.root}/{rel}", limit=self.bounds.record_limit), rel),
                self.bounds,
            )
            if rec.n_seq < n_seq:
                raise ValueError(f"it holds {rec.n_seq} sequences, {n_seq} needed")
            # Mapped on a local store (copy-on-write: the tensor is a writable view of the file's pages, no copy).
            data = self.store.read_mapped(f"{self.root}/{rec.file}", size=rec.bytes)
            if hashlib.sha256(data).hexdigest() != rec.sha256:
                raise ValueError("its bytes fail their sha256 checksum")
            tokens = shard.decode(
                data,  # type: ignore[arg-type]  # a mapped file reads as bytes
                codec="none",
                expect={"tokens": (torch.int32, (rec.n_seq, self.key.context_size))},
            )["tokens"]
            low, high = (int(tokens.min()), int(tokens.max())) if tokens.numel() else (0, 0)
            if self.vocab_size is not None and (low < 0 or high >= self.vocab_size):
                # Its record vouches for it (a forged or foreign cache): drop the record, or no rerun rebuilds it.
                with contextlib.suppress(ActcacheError, OSError):
                    self.store.remove([f"{self.root}/{rel}"])
                raise ValueError(
                    f"it holds token id {low if low < 0 else high}, outside the tokenizer's 0..{self.vocab_size - 1}"
                )
        except (ValueError, FileNotFoundError) as e:
            raise Failure(f"{where} is damaged or missing ({e}); rerun the same command: it is rebuilt") from e
        if self.model is not None:
            self.model.check_embedded(high, f"a token in {where}")
        return tokens[:n_seq]
