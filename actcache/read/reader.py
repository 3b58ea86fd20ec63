"""Reading a set back: its manifest, its shards as tensors, and a checksum verification."""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from actcache.errors import ActcacheError, Failure
from actcache.extraction import environment
from actcache.format import layout, manifest, records
from actcache.format.key import ShuffleKey, key_from_dict
from actcache.storage.store import DamagedFile, Store, StoreRef

if TYPE_CHECKING:
    import torch

RECORD_FOLLOWS_S = 2.0
"""How long a reader of an object store waits for a new record before it calls a shard that disagrees with its
record damaged: a run extending the set writes the record one request after the shard."""

LAYOUTS = ("sequences", "rows")
"""``sequences``: shards of whole sequences as extracted. ``rows``: shards of single token positions (e.g. a globally
shuffled copy), each with the flat index of its row in the source set."""


@dataclass(frozen=True)
class Shard:
    index: int
    activations: torch.Tensor
    """``[n_seq, context_size, d]`` (layout ``sequences``) or ``[n_rows, d]`` (``rows``), in the storage dtype."""
    tokens: torch.Tensor
    """``[n_seq, context_size]`` or ``[n_rows]`` int32 token ids."""
    positions: torch.Tensor | None = None
    """``rows`` layout: ``[n_rows]`` int64, each row's flat index (sequence * context_size + position) in the set
    it came from. None for ``sequences`` (there the position is the index itself)."""


class Problem(str):
    """One thing ``verify`` found, and whether a plain rerun of the extract repairs it (else --verify-existing)."""

    plain_rerun: bool

    def __new__(cls, text: str, plain_rerun: bool) -> Problem:
        p = super().__new__(cls, text)
        p.plain_rerun = plain_rerun
        return p


class ActivationSet:
    def __init__(
        self,
        url: str | StoreRef,
        storage_options: dict[str, Any] | None = None,
        *,
        credentials_block: str | None = None,
    ):
        store_ref, self.set_id = StoreRef.of(url, storage_options, credentials_block).split()
        self.store = store_ref.open()
        self.url = self.store.url_of(self.set_id)
        self.manifest = m = manifest.read(self.store, self.set_id)
        self.key = key_from_dict(m["key"])
        self.records = list(records.records_of(m["shards"], records.Bounds.of(self.key)).values())
        self.layout: str = m.get("layout", "sequences")
        if self.layout not in LAYOUTS:
            raise ActcacheError(
                f"set {self.url} has layout {self.layout!r}, which this actcache cannot read "
                f"(it reads {', '.join(LAYOUTS)}); upgrade actcache"
            )
        rows = self.layout == "rows"
        self.d: int = m["d"]
        from actcache.format import width

        self.width = width.of(self.key, m)
        """What the key vouches for about the set's width (a shuffled copy: its source's key), and why not."""
        try:  # manifest.read checked d against what this machine holds; a config fetched from the hub counts too
            manifest.check_width(m, self.key, self.d, self.width.values)
        except ValueError as e:
            raise Failure(f"manifest of {self.url} is malformed ({e}); re-extract the set or copy it again") from e
        self.key_width = self.width.values
        """Values per token a true shard of the key holds (manifest.read checked ``d`` against it), or None when
        nothing the key vouches for says: then a shard is bounded by its stored size (``shard.inflation_cap``)."""
        self.bounds = records.Bounds.of(self.key, record_limit=records.record_cap(self.key_width))
        self.tokenization: dict[str, Any] = m.get("tokenization") or {}
        self.context_size: int | None = self.tokenization.get("context_size") if rows else self.key.tokens.context_size  # type: ignore[union-attr]
        """Tokens per sequence of the extraction (None for a rows set whose manifest does not say)."""

    def __len__(self) -> int:
        return len(self.records)

    def holds(self, store: Store) -> bool:
        """Whether ``store`` lies within this set's folder (a set written there would nest inside this one); local
        paths are compared through links and ``..``."""
        a, b = store.url, self.url
        if store.local and self.store.local:
            a, b = os.path.realpath(a), os.path.realpath(b)
        return (a.rstrip("/") + "/").startswith(b.rstrip("/") + "/")

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (a property: opening a set to list or check it imports no torch)."""
        from actcache.format import shard

        return shard.TORCH_DTYPES[self.manifest["dtype"] if self.layout == "rows" else self.key.dtype]  # type: ignore[union-attr]

    @property
    def n_tokens(self) -> int:
        return sum(r.n_tokens for r in self.records)

    def tensor_specs(self, record: records.Record) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Each tensor's dtype (by name) and shape, from the key (dtype, context, at most seqs_per_shard
        sequences) and the manifest's d (checked against its hook_shape, and against the shard's own header)."""
        if isinstance(self.key, ShuffleKey):  # "rows": manifest.read checked dtype and d (see _check_encoding)
            n = record.n_seq
            return {
                "activations": (self.manifest["dtype"], (n, self.manifest["d"])),
                "tokens": ("int32", (n,)),
                "positions": ("int64", (n,)),
            }
        ctx = self.key.tokens.context_size
        return {
            "activations": (self.key.dtype, (record.n_seq, ctx, self.manifest["d"])),
            "tokens": ("int32", (record.n_seq, ctx)),
        }

    def shard_cap(self, stored: int) -> int | None:
        """The most bytes a shard stored in ``stored`` bytes may decode to: a true shard of the key's shape (at most
        ``seqs_per_shard`` sequences of ``context_size`` rows of ``d`` values, as wide as the key allows), or None
        where the key vouches for no width. An example set's text columns hold the dataset's text: for them, at most
        ``shard.TEXT_VALUE_LIMIT`` bytes per example and kept column are added."""
        if self.key_width is None:
            return None
        from actcache.format.header import HEADER_ALLOWANCE, itemsize

        if isinstance(self.key, ShuffleKey):  # rows of activations, a token id and a position each
            return 8 + HEADER_ALLOWANCE + self.key.rows_per_shard * (self.d * itemsize(self.manifest["dtype"]) + 12)
        sps, ctx = self.key.tokens.seqs_per_shard, self.key.tokens.context_size
        act = self.d * itemsize(self.key.dtype)
        if not self.manifest.get("examples"):
            return 8 + HEADER_ALLOWANCE + sps * ctx * (act + 4)  # activations and an int32 token id per row
        # One example per sequence: the rows the key's --positions keeps (0: all its tokens), its tokens, length and
        # index, and a number (or a text's offset) per kept column.
        rows = records.Bounds.of(self.key).context_size or ctx
        cols = len([c for c in self.key.keep_columns.split(",") if c])
        cap = 8 + HEADER_ALLOWANCE + sps * (rows * act + ctx * 4 + 12 + 8 * cols) + 8 * cols
        if self.text_columns:
            from actcache.format.shard import TEXT_VALUE_LIMIT

            cap += (
                sps * cols * TEXT_VALUE_LIMIT
            )  # every kept column counted as text: the manifest's types are forgeable
        return cap

    @property
    def text_columns(self) -> bool:
        """Whether an example set keeps a text column: its bytes are the dataset's, bounded by no key."""
        info = self.manifest.get("examples")
        return isinstance(info, dict) and "str" in (info.get("columns") or {}).values()

    def unbounded_why(self, error: BaseException) -> str:
        """For a shard the stored-size bound refused (``error``) where the key vouches for no width: why not, and
        how to make the bound exact, as the end of its line; else empty."""
        if not self.width.why_not or "decompression bomb" not in str(error):
            return ""
        return f"; its key's width would bound it exactly, but {self.width.why_not}"

    def check_stored_size(self, record: records.Record) -> None:
        """A shard whose record claims more stored bytes than a true shard of the key can take (zstd may add 1/128
        and a few bytes) is damage, named before it is read: reading it would allocate what the record claims."""
        cap = self.shard_cap(0)
        if cap is not None and record.bytes > cap + (cap >> 7) + 4096:
            raise DamagedFile(
                f"shard {record.index} of {self.url} claims {record.bytes} stored bytes, more than a true shard of "
                f"its key ({cap} bytes); rerun the extraction to repair it"
            )

    def expect(self, record: records.Record) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """``tensor_specs`` with torch dtypes, as decoding checks them."""
        import torch  # here, not at the top: manifests, listings and checksums (ls, show, verify) need no torch

        return {name: (getattr(torch, dtype), shape) for name, (dtype, shape) in self.tensor_specs(record).items()}

    def read(self, record: records.Record, *, verify: bool = False) -> Shard:
        """One shard. Its tensors are views of the bytes read, with no copy (of the file's pages, memory-mapped
        copy-on-write, on a local store)."""
        from actcache.format import shard

        if self.manifest.get("examples"):
            raise ActcacheError(
                f"set {self.url} holds one sequence per example (--packing none); read it with "
                "actcache.load_examples(url) or ActivationDataset(url, ...)"
            )
        rel = f"{self.set_id}/{record.file}"
        self.check_stored_size(record)
        try:
            data = self.store.read_mapped(rel, size=record.bytes)
        except FileNotFoundError as e:
            self.check_current(record)
            raise Failure(
                f"shard {record.index} of {self.url} is missing ({record.file}); run `actcache verify` "
                "and rerun the extraction to repair it"
            ) from e
        except DamagedFile as e:
            self.check_current(record)
            raise DamagedFile(
                f"shard {record.index} of {self.url} is unreadable ({e}); rerun the extraction to repair it"
            ) from e
        if verify and hashlib.sha256(data).hexdigest() != record.sha256:
            self.check_current(record)
            raise Failure(
                f"shard {record.index} of {self.url} fails its checksum; run `actcache verify` "
                "and rerun the extraction to repair it"
            )
        try:
            t = shard.decode(
                data,  # type: ignore[arg-type]  # a mapped file reads as bytes
                codec=self.manifest["codec"],
                expect=self.expect(record),  # type: ignore[arg-type]
                cap=self.shard_cap(len(data)),
            )
        except Exception as e:
            raise DamagedFile(f"shard {record.index} of {self.url} is unreadable ({e}{self.unbounded_why(e)})") from e
        return Shard(record.index, t["activations"], t["tokens"], t.get("positions"))

    def in_flux(self) -> str | None:
        """Why what ``verify`` finds may be a run's work in progress rather than damage (a live writer's lease on the
        set, or a manifest that is no longer the one opened); None if neither. A run extending the set rewrites its
        last shard and record before its manifest: until then the new bytes disagree with the manifest read."""
        from actcache.storage import leases

        try:
            writers = leases.live(self.store, self.set_id)
        except Exception:  # unreadable leases: judge the shards
            writers = []
        if writers:
            w = writers[0]
            return f"is being written by {w.writer()} (lease {self.store.url_of(w.rel)})"
        try:
            now = manifest.read(self.store, self.set_id)
        except Exception:  # gone or unreadable since: what the shards show is what verify reports
            return None
        if now != self.manifest:
            return "changed while it was verified (a run extended or rewrote it)"
        return None

    def check_current(self, record: records.Record) -> None:
        """Raise a one-line ``Failure`` if ``record``'s shard was rewritten by a run since this set was opened (its
        last shard grows while --max-tokens is raised): the data is fine, the reader's view of it is old. Or
        that the set was removed since (``rm`` deletes its manifest first): nothing is damaged, it is gone."""
        try:
            gone = not self.store.exists(f"{self.set_id}/{layout.MANIFEST}")
        except ActcacheError:
            gone = False
        if gone:
            raise Failure(
                f"{self.url} was removed since it was opened (`actcache rm`?): its manifest is gone; nothing of it "
                "is left to read"
            )
        now = self._stored_record(record.index)
        # On an object store a run puts a shard, then (one request later) its record: a shard read in between
        # holds the new bytes under the old record. The record that follows tells; only then is the shard blamed.
        waited = 0.0
        while now == record and not self.store.local and waited < RECORD_FOLLOWS_S:
            time.sleep(0.25)
            waited += 0.25
            now = self._stored_record(record.index)
        if now is None:
            return  # no sound record to tell: the shard is what is wrong
        if now != record:
            raise Failure(
                f"{self.url} changed since it was opened: shard {record.index} was rewritten (an extraction is "
                "extending the set); open it again once the extraction has finished"
            )

    def _stored_record(self, index: int) -> records.Record | None:
        """Shard ``index``'s completion record as stored now; None if it is missing or unsound."""
        try:
            return records.Record.from_dict(
                records.check_sealed(
                    self.store.read_json(f"{self.set_id}/{layout.record_file(index)}", limit=self.bounds.record_limit),
                    "record",
                ),
                self.bounds,
            )
        except (ActcacheError, ValueError, KeyError, TypeError, FileNotFoundError):
            return None

    def read_tokens(self, record: records.Record) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A shard's token ids, flat, and its positions (rows layout; else None). Uncompressed shards are read
        only where these tensors lie (a few bytes per row); compressed ones whole."""
        from actcache.format import shard

        names = ("tokens", "positions") if self.layout == "rows" else ("tokens",)
        if self.manifest["codec"] != "none":
            s = self.read(record)
            return s.tokens.reshape(-1), s.positions
        rel = f"{self.set_id}/{record.file}"
        expect = self.expect(record)
        try:
            head = self.store.read_range(rel, 0, min(record.bytes, 1 << 16))
            if len(head) >= 8 and 8 + int.from_bytes(head[:8], "little") > len(head):  # a header above 64 KB
                head = self.store.read_range(rel, 0, min(record.bytes, 8 + int.from_bytes(head[:8], "little")))
            start, entries = shard.header(head, size=record.bytes)
            out = {}
            for name in names:
                if name not in entries:
                    raise ValueError(f"shard has no tensor {name!r} (has {sorted(entries)})")
                dtype, shape, begin, end = entries[name]
                out[name] = shard.tensor(self.store.read_range(rel, start + begin, start + end), dtype, shape)
            shard.check(out, {k: expect[k] for k in names})
        except FileNotFoundError as e:
            self.check_current(record)
            raise Failure(
                f"shard {record.index} of {self.url} is missing ({record.file}); run `actcache verify` "
                "and rerun the extraction to repair it"
            ) from e
        except ValueError as e:  # DamagedFile too
            self.check_current(record)
            raise DamagedFile(f"shard {record.index} of {self.url} is unreadable ({e})") from e
        return out["tokens"].reshape(-1), out.get("positions")

    def __iter__(self) -> Iterator[Shard]:
        for r in self.records:
            yield self.read(r)

    def environments(self) -> dict[str, str]:
        """Where the environments that wrote this set's shards disagree: {field: one line} (see ``environment``)."""
        return environment.differences({r.index: r.extra.get("env") for r in self.records})

    @property
    def n_target_shards(self) -> int:
        """How many shards the extraction that wrote this set asked for (its ``target_tokens``); a shuffled
        copy's are all written at once (its own command makes it whole), so it counts the shards it has."""
        if isinstance(self.key, ShuffleKey):
            return len(self.records)
        tokens = self.key.tokens
        target_seqs = int(self.manifest.get("target_tokens") or 0) // tokens.context_size
        return math.ceil(target_seqs / tokens.seqs_per_shard)

    def missing(self, limit: int = 10_000) -> list[int]:
        """Indices of the shards the set's target asks for that it does not have (an unfinished extraction): the
        first ``limit`` of them, as the manifest's target may name any number (``n_missing`` counts them all)."""
        have = {r.index for r in self.records}
        out: list[int] = []
        for i in range(self.n_target_shards):  # stops after at most len(have) + limit steps
            if len(out) >= limit:
                break
            if i not in have:
                out.append(i)
        return out

    def n_missing(self) -> int:
        """How many shards the set's target asks for that it does not have."""
        n = self.n_target_shards
        return n - sum(1 for r in self.records if r.index < n)

    def verify(self, *, on_shard=None, on_total=None) -> list[Problem]:
        """Every problem found (shards missing from the target, missing files, wrong size, bad checksum, damaged
        or missing records, damaged token shards, an engine other than the key's); empty when sound. Each says
        whether a plain rerun repairs it (see ``Problem``). ``on_total(n)`` once the shards to check are known,
        ``on_shard(record)`` after each (progress)."""
        from actcache.format.header import check_header  # no torch: verify starts in a fraction of a second

        problems: list[Problem] = []
        gone, n_gone = self.missing(limit=11), self.n_missing()
        if gone:
            shown = ", ".join(map(str, gone[:10])) + (", ..." if n_gone > 10 else "")
            problems.append(
                Problem(
                    f"incomplete: {n_gone} of {self.n_target_shards} shards missing "
                    f"(indices {shown}); rerun the same extract to finish the set",
                    True,
                )
            )
        engine = self.manifest["key"].get("forward", "bridge")
        wrong = [r.index for r in self.records if (r.extra.get("env") or {}).get("engine", engine) != engine]
        if wrong:
            problems.append(
                Problem(
                    f"shards {wrong[:10]} were computed by another engine than the set key's "
                    f"{engine!r}; delete them and rerun the extract",
                    True,
                )
            )
        scan = records.scan_set(self.store, self.key, record_limit=self.bounds.record_limit)
        scan.bounds = records.Bounds.of(self.key, d=self.manifest.get("d"), record_limit=self.bounds.record_limit)
        listing = scan.entries
        in_manifest = {r.index for r in self.records}
        if on_total:
            on_total(len(self.records))
        for r in self.records:
            if on_shard:  # (counted as it starts: a ``continue`` below skips nothing of the count)
                on_shard(r)
            plain = not scan.is_done(r.index, r.n_seq)  # what a plain rerun sees, by its own rule

            def problem(text: str, r: records.Record = r, plain: bool = plain) -> None:
                problems.append(Problem(f"shard {r.index}: {text}", plain))

            entry = listing.get(r.file)
            if entry is None:
                problem(f"{r.file} is missing (or not a regular file)")
            elif entry.size != r.bytes:
                problem(f"{r.file} has {entry.size} bytes, expected {r.bytes} (truncated?)")
            else:
                try:
                    data = self.store.read_bytes(f"{self.set_id}/{r.file}", size=r.bytes)
                except (DamagedFile, FileNotFoundError) as e:
                    problem(f"{r.file} is unreadable ({e})")
                else:
                    if hashlib.sha256(data).hexdigest() != r.sha256:
                        problem(f"{r.file} fails its sha256 checksum (corrupted)")
                    elif not self.manifest.get("examples"):  # (an example set's shapes vary: load_examples)
                        try:  # what the manifest says shapes reading: the shard's own header must agree
                            check_header(
                                data,
                                codec=self.manifest["codec"],
                                expect=self.tensor_specs(r),
                                provenance=self.bounds.provenance(r),
                            )
                        except ValueError as e:
                            problem(f"{r.file}: its safetensors header disagrees with manifest.json ({e})")
            rel = layout.record_file(r.index)
            if rel not in listing:
                problem(f"completion record {rel} is missing")
                continue
            try:
                limit = self.bounds.record_limit
                rec = records.Record.from_dict(
                    records.check_sealed(self.store.read_json(f"{self.set_id}/{rel}", limit=limit), rel),
                    self.bounds,
                )
            except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
                problem(f"completion record {rel} is damaged ({e})")
                continue
            if rec != r:
                problem(f"completion record {rel} disagrees with manifest.json")
        for rel in listing:
            i = layout.parse_record_file(rel)
            if i is not None and i not in in_manifest:
                problems.append(Problem(f"shard {i}: completed but not in manifest.json", True))
        problems += self._verify_tokens()
        return problems

    def _verify_tokens(self) -> list[Problem]:
        """Damaged token shards of this set's token cache (a missing one is fine: a run rebuilds it if needed)."""
        from actcache.extraction.tokens import TokenCache

        if isinstance(self.key, ShuffleKey):
            return []  # a shuffled copy has no token cache of its own
        cache = TokenCache(self.store, self.key.tokens)
        scan = cache.scan()
        out = []
        for r in self.records:
            tr = scan.records.get(r.index)
            if tr is None or tr.file not in scan.entries:
                continue
            if tr.n_seq < r.n_seq or not records.hash_matches(self.store, cache.root, tr, cache.bounds):
                out.append(
                    Problem(
                        f"token shard {r.index} ({cache.root}/{tr.file}) fails its checksum or is short (corrupted)",
                        False,
                    )
                )
        return out

    def non_finite(self) -> str | None:
        """One line on NaN/Inf values in the set and what to do, or None."""
        return manifest.describe_non_finite(self.manifest)


def open_set(
    url: str | StoreRef, storage_options: dict[str, Any] | None = None, *, credentials_block: str | None = None
) -> ActivationSet:
    """Open the activation set at ``url`` (``<store>/<set_id>``: a local path, s3://bucket/prefix/<set_id>, ...).

    ``url`` may be a ``StoreRef`` of the set (as ``Plan.refs`` gives), which carries its options and block;
    otherwise ``storage_options`` go to fsspec (e.g. ``{"endpoint_url": ...}``) and ``credentials_block``
    names a Prefect AwsCredentials block (default: the AWS chain: env, profile, instance role).
    """
    return ActivationSet(url, storage_options, credentials_block=credentials_block)
