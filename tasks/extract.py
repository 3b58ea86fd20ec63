"""Stage 2: one forward pass per shard, stopped right after the deepest requested hook."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from actcache import handoff
from actcache.extraction import Extractor
from actcache.plan import Plan, bridge_for
from actcache.tokens import ShardWork
from tasks.refs import ActivationsRef


@task(name="extract", cache_policy=NO_CACHE)
def extract(plan: Plan, work: ShardWork) -> list[ActivationsRef]:
    """Compute shard ``work.index`` for every hook still missing it (model loaded once per process)."""
    hooks = [s.hook for s in plan.todo(work)]
    tokens = plan.token_cache().load(work.index)
    if len(tokens) != work.n_seq:
        raise RuntimeError(f"token shard {work.index} holds {len(tokens)} sequences, expected {work.n_seq}")
    acts = Extractor(bridge_for(plan.config), hooks, batch_size=plan.config.batch_size)(tokens)
    return [ActivationsRef(handoff.put((tokens, acts[h])), h, work.index, work.n_seq) for h in hooks]
