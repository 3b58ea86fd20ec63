"""Stage 2: one forward pass per shard, stopped right after the deepest requested hook."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from actcache import faults, handoff
from actcache.extraction import extractor_for
from actcache.plan import Plan, model_for
from actcache.tokens import ShardWork
from tasks.refs import ActivationsRef


@task(name="extract", task_run_name="extract-{work.index:06d}", cache_policy=NO_CACHE)
def extract(plan: Plan, work: ShardWork) -> list[ActivationsRef]:
    """Compute shard ``work.index`` for every hook still missing it (model loaded once per process)."""
    hooks = [s.hook for s in plan.todo(work)]
    tokens = plan.token_cache().load(work.index, work.n_seq)  # checksummed; the first n_seq of a full shard
    cfg = plan.config
    step = extractor_for(model_for(cfg), hooks, batch_size=cfg.batch_size, model_dtype=cfg.model_dtype,
                         device=cfg.device, out_dtype=cfg.dtype)
    acts = step(tokens)
    faults.point("extract.forward-done")
    return [ActivationsRef(handoff.put((tokens, acts[h])), h, work.index, work.n_seq) for h in hooks]
