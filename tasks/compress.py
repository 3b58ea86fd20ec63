"""Stage 3: statistics of the shard, then the codec, from the shard file's own buffer."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from actcache import faults, handoff, shard, shardfile
from actcache.plan import Plan
from tasks.refs import ActivationsRef, PackedRef


@task(name="compress", cache_policy=NO_CACHE)
def compress(plan: Plan, ref: ActivationsRef) -> PackedRef:
    """Encode one shard; record its stats and compression ratio."""
    hook_set = plan.hook_set(ref.hook)
    key = hook_set.key
    f: shardfile.ShardFile = handoff.get(ref.handle)
    acts = f.tensors["activations"]  # [n_seq, context, d] in the storage dtype
    # Everything computed from the activations goes here, before the codec (which may release them).
    extra = {
        "set_id": key.id,
        "stats": shard.stats(acts),
        "hook_shape": list(hook_set.hook_shape or [acts.shape[-1]]),
    }
    del acts
    payload = shardfile.encode(f, codec=key.codec, level=key.codec_level)
    handoff.drop(ref.handle)
    faults.point("compress.encoded")
    n_tokens = ref.n_seq * key.tokens.context_size
    nbytes = len(payload.data)
    extra |= {
        "raw_bytes": payload.raw_bytes,
        "codec_ratio": round(payload.raw_bytes / nbytes, 4),
        "bytes_per_token": round(nbytes / n_tokens, 2),
    }
    return PackedRef(handoff.put(payload), ref.hook, ref.index, ref.n_seq, payload.sha256, nbytes, extra)
