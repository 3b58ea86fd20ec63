"""Stage 3: statistics of the shard, then the codec, from the shard file's own buffer."""

from __future__ import annotations

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from actcache import crashpoints
from actcache.extraction import environment, handles
from actcache.extraction.plan import Plan
from actcache.format import moments, shard, shardfile
from actcache.read.exclude import special_ids
from actcache.tasks.refs import ActivationsRef, PackedRef


@task(name="compress", task_run_name="compress-{ref.index:06d}", cache_policy=NO_CACHE)
def compress(plan: Plan, ref: ActivationsRef) -> PackedRef:
    """Encode one shard; record its stats and compression ratio."""
    hook_set = plan.hook_set(ref.hook)
    key = hook_set.key
    f: shardfile.ShardFile = handles.get(ref.handle)
    acts = f.tensors["activations"]  # [n_seq, context, d] in the storage dtype
    # Everything computed from the activations goes here, before the codec (which may release them).
    stats = shard.stats(acts)
    extra = {
        "set_id": key.id,
        "stats": stats,
        moments.RECORD_FIELD: moments.of(acts).to_json(),
        moments.BY_TOKEN_FIELD: by_token(plan, acts, f.tensors["tokens"]).to_json(),
        "hook_shape": list(hook_set.hook_shape or [acts.shape[-1]]),
        "env": environment.current(plan.config.device, key.forward),  # who computed it (a mixed fleet shows)
    }
    del acts
    if stats["nan"] or stats["inf"]:
        where = f"shard {ref.index} of {key.hook}"
        extra["source_finite"] = shard.warn_non_finite(stats, f.source_finite, key.dtype, key.id, where)
    payload = shardfile.encode(f, codec=key.codec, level=key.codec_level)
    handles.drop(ref.handle)
    crashpoints.point("compress.encoded")
    n_tokens = ref.n_seq * key.tokens.context_size
    nbytes = len(payload.data)
    extra |= {
        "raw_bytes": payload.raw_bytes,
        "codec_ratio": round(payload.raw_bytes / nbytes, 4),
        "bytes_per_token": round(nbytes / n_tokens, 2),
    }
    return PackedRef(handles.put(payload), ref.hook, ref.index, ref.n_seq, payload.sha256, nbytes, extra)


def by_token(plan: Plan, acts, tokens) -> moments.ByToken:
    """The shard's moments by group (first position or not, special token or not): what lets a reader that
    excludes special tokens or BOS positions normalise with the exact statistics of the rows it yields."""
    first = torch.zeros(tokens.shape, dtype=torch.bool)
    first[:, 0] = True  # tokens: [n_seq, context]
    return moments.by_token(acts, tokens, first, special_ids(plan.provenance["tokenization"]))
