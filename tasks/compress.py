"""Stage 3: cast to the storage dtype, serialize as safetensors, apply the codec."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from actcache import environment, faults, handoff, moments, shard
from actcache.plan import Plan
from tasks.refs import ActivationsRef, PackedRef


@task(name="compress", task_run_name="compress-{ref.index:06d}", cache_policy=NO_CACHE)
def compress(plan: Plan, ref: ActivationsRef) -> PackedRef:
    """Encode one shard; record its stats and compression ratio."""
    hook_set = plan.hook_set(ref.hook)
    key = hook_set.key
    tokens, acts = handoff.get(ref.handle)
    cast = acts.to(shard.TORCH_DTYPES[key.dtype])
    enc = shard.encode({"activations": cast, "tokens": tokens},
                       codec=key.codec, level=key.codec_level,
                       metadata={"set_id": key.id, "hook": key.hook, "index": str(ref.index)})
    handoff.drop(ref.handle)
    faults.point("compress.encoded")
    n_tokens = ref.n_seq * key.tokens.context_size
    stats = shard.stats(cast)
    extra = {
        "set_id": key.id,
        "stats": stats,
        moments.RECORD_FIELD: moments.of(cast).to_json(),
        "raw_bytes": enc.raw_bytes,
        "codec_ratio": round(enc.raw_bytes / len(enc.data), 4),
        "bytes_per_token": round(len(enc.data) / n_tokens, 2),
        "hook_shape": list(hook_set.hook_shape or [cast.shape[-1]]),
        "env": environment.current(plan.config.device, key.forward),  # who computed it (a mixed fleet shows)
    }
    if stats["nan"] or stats["inf"]:
        where = f"shard {ref.index} of {key.hook}"
        extra["source_finite"] = shard.warn_non_finite(stats, acts, key.dtype, key.id, where)
    return PackedRef(handoff.put(enc.data), ref.hook, ref.index, ref.n_seq, enc.sha256, len(enc.data), extra)
