"""Activation sets for tests that read them (import as ``setwriter``).

``extract_by_stages`` runs a real extraction with the flow's own stages, without Prefect (``run_sequential``).
``write_set`` writes a set with actcache's own shard encoder, records and manifest but no model, for readers'
tests and the benchmark, where the format matters and the numbers do not: random activations, and token ids with BOS,
separators and pads where an extraction would put them. (``actcache.sets.shuffle.shuffle_set`` makes a "rows" copy.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from actcache.format import layout, manifest, moments, records, shard
from actcache.format.commit import Shard, commit
from actcache.format.key import SetKey, TokensKey
from actcache.storage.store import Store

BOS, EOS, PAD = 0, 1, 2
"""Special token ids of the synthetic sets (EOS is also the separator)."""


def extract_by_stages(cfg) -> str:
    """Extract ``cfg`` (an ``ExtractConfig``) with the flow's stages in the flow's order, without Prefect
    (``stages.run_sequential``: no server to start; the flow itself is tested in tests/flows and tests/tasks);
    returns the (first) set's URL."""
    return extract_sets_by_stages(cfg)[0]


def extract_sets_by_stages(cfg) -> list[str]:
    """``extract_by_stages`` for several hooks (``hook="a,b"``): every set's URL, in the order of the hooks."""
    from actcache.extraction.stages import run_sequential

    return run_sequential(cfg)


def tokenization(ctx: int, vocab: int, *, recorded: tuple[str, ...] = ("eos_id", "pad_id", "vocab_size")) -> dict:
    """The manifest's tokenization entry; ``recorded`` leaves out fields as older versions did."""
    t = {
        "tokenizer": "synthetic",
        "context_size": ctx,
        "prepend_bos": True,
        "bos_id": BOS,
        "separator": "eos",
        "separator_id": EOS,
        "eos_id": EOS,
        "pad_id": PAD,
        "vocab_size": vocab,
    }
    return {k: v for k, v in t.items() if k not in ("eos_id", "pad_id", "vocab_size") or k in recorded}


def tokens_for(n_seq: int, ctx: int, vocab: int, g: torch.Generator) -> torch.Tensor:
    t = torch.randint(3, vocab, (n_seq, ctx), generator=g, dtype=torch.int32)
    t[torch.rand(n_seq, ctx, generator=g) < 0.05] = EOS  # documents end here and there
    t[torch.rand(n_seq, ctx, generator=g) < 0.01] = PAD
    t[:, 0] = BOS
    return t


class Stats:
    """The manifest's ``stats`` entry (the agreed schema), accumulated shard by shard in float64."""

    def __init__(self, d: int):
        self.n, self.sum, self.sumsq = 0, torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
        self.norm, self.sq_norm, self.nan, self.inf = 0.0, 0.0, 0, 0

    def add(self, acts: torch.Tensor) -> None:
        x = acts.reshape(-1, acts.shape[-1]).double()
        norms = x.norm(dim=1)
        self.n += len(x)
        self.sum += x.sum(0)
        self.sumsq += (x * x).sum(0)
        self.norm += float(norms.sum())
        self.sq_norm += float((norms**2).sum())
        self.nan += int(torch.isnan(x).sum())
        self.inf += int(torch.isinf(x).sum())

    def entry(self) -> dict:
        mean = self.sum / self.n
        mean_norm = self.norm / self.n
        return {
            "n": self.n,
            "mean": mean.tolist(),
            "var": (self.sumsq / self.n - mean**2).tolist(),
            "mean_norm": mean_norm,
            "mean_sq_norm": self.sq_norm / self.n,
            "scale": math.sqrt(len(mean)) / mean_norm,
            "nan": self.nan,
            "inf": self.inf,
        }


def write_set(
    store: str | Path,
    *,
    shards: int,
    seqs: int,
    ctx: int,
    d: int,
    dtype: str = "float16",
    codec: str = "none",
    level: int = 0,
    seed: int = 0,
    vocab: int = 512,
    last_seqs: int | None = None,
    recorded: tuple[str, ...] = ("eos_id", "pad_id", "vocab_size"),
    with_stats: bool = False,
    with_moments: bool = False,
    bos_scale: float = 1.0,
    hook: str = "blocks.0.hook_resid_post",
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> str:
    """A ``sequences`` set of ``shards`` shards of ``seqs`` sequences (the last of ``last_seqs``); returns its URL.

    ``with_moments``: records carry their moments (and by token group) and the manifest's stats are merged from
    them, as extraction writes them. ``bos_scale``: BOS rows (each sequence's first) are that much larger, as in
    real models. ``hook`` with ``transform`` (applied to each shard's ``[seqs, ctx, d]`` activations) writes
    another hook's set of the same tokens, as one run with ``--hook a,b`` does: e.g. an MLP's output from its
    input."""
    st = Store(str(store))
    tkey = TokensKey(
        dataset=f"synthetic:{seed}",
        tokenizer="synthetic",
        text_column="text",
        context_size=ctx,
        prepend_bos=True,
        separator=EOS,
        seqs_per_shard=seqs,
    )
    key = SetKey(
        tokens=tkey,
        model="synthetic",
        model_dtype="float32",
        hook=hook,
        dtype=dtype,
        codec=codec,
        codec_level=level,
        forward="synthetic",
    )
    g = torch.Generator().manual_seed(seed)
    recs, stats = [], Stats(d)
    offset = torch.randn(d, generator=g) * 2  # not centred, not unit: normalisation has something to do
    for i in range(shards):
        n = last_seqs if (i == shards - 1 and last_seqs is not None) else seqs
        acts = torch.randn(n, ctx, d, generator=g) * 3 + offset
        acts[:, 0] *= bos_scale
        if transform is not None:
            acts = transform(acts)
        acts = acts.to(shard.TORCH_DTYPES[dtype])
        tokens = tokens_for(n, ctx, vocab, g)
        if with_stats:
            stats.add(acts)
        extra = {}
        if with_moments:
            first = torch.zeros(tokens.shape, dtype=torch.bool)
            first[:, 0] = True
            extra = {
                moments.RECORD_FIELD: moments.of(acts).to_json(),
                moments.BY_TOKEN_FIELD: moments.by_token(acts, tokens, first, (BOS, EOS, PAD)).to_json(),
            }
        recs.append(_put(st, key.id, i, {"activations": acts, "tokens": tokens}, n, n * ctx, codec, level, extra=extra))
    provenance = {
        "hook": key.hook,
        "hook_shape": [d],
        "tokenization": tokenization(ctx, vocab, recorded=recorded),
        "model": {"name": "synthetic"},
    }
    m = manifest.build(key, provenance, [moments.without(r) for r in recs], target_seqs=sum(r.n_seq for r in recs))
    if with_stats:
        m["stats"] = stats.entry()
    if with_moments:
        m |= moments.merged(
            recs,
            d,
            full=lambda r: r.n_seq == seqs,
            previous=None,
            moments_of=moments.from_records(st, key.id, d),
            by_token_of=moments.from_records(st, key.id, d, moments.BY_TOKEN_FIELD),
        )
    manifest.write(st, key.id, m)  # sealed, as actcache writes it
    return st.url_of(key.id)


def _put(
    st: Store,
    set_id: str,
    index: int,
    tensors: dict[str, torch.Tensor],
    n_seq: int,
    n_tokens: int,
    codec: str,
    level: int,
    extra: dict | None = None,
) -> records.Record:
    enc = shard.encode(tensors, codec=codec, level=level)
    rel = layout.shard_file(index, codec)
    rec = records.Record(index, rel, n_seq, n_tokens, enc.sha256, len(enc.data), extra or {})
    commit(st, set_id, [Shard(rec, enc.data)])
    return rec
