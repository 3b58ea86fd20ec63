"""Stage 2: one forward pass per shard, stopped right after the deepest requested hook."""

from __future__ import annotations

import math

from prefect import task
from prefect.cache_policies import NO_CACHE

from actcache import faults, handoff
from actcache.plan import Plan
from actcache.tokens import ShardWork
from tasks.refs import ActivationsRef


@task(name="extract", task_run_name="extract-{work.index:06d}", cache_policy=NO_CACHE)
def extract(plan: Plan, work: ShardWork) -> list[ActivationsRef]:
    """Compute shard ``work.index`` for every hook still missing it (model loaded once per process)."""
    hooks = [s.hook for s in plan.todo(work)]
    tokens = plan.token_cache().load(work.index, work.n_seq)  # checksummed; the first n_seq of a full shard
    acts = plan.extractor(hooks)(tokens)  # the pinned model and engines: nothing is resolved again here
    for h in hooks:  # the manifest's d comes from the plan's shape: a disagreement is a bug, never a set
        shape = plan.hook_set(h).hook_shape
        if acts[h].shape[-1] != math.prod(shape):
            raise RuntimeError(f"hook {h!r} gave width {acts[h].shape[-1]}, the plan says {list(shape)}")
    faults.point("extract.forward-done")
    return [ActivationsRef(handoff.put((tokens, acts[h])), h, work.index, work.n_seq) for h in hooks]
