"""Validate the request and find out what the store already holds."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from actcache.config import ExtractConfig
from actcache.plan import Plan, make_plan


@task(name="plan", cache_policy=NO_CACHE)
def plan_extraction(config: ExtractConfig, partition_index: int = 0, num_partitions: int = 1) -> Plan:
    """Resolve model, dataset and keys; list each set's completed shards once."""
    return make_plan(config, partition_index=partition_index, num_partitions=num_partitions)


@task(name="skip-cached", cache_policy=NO_CACHE)
def skip_cached(plan: Plan) -> State:
    """Show the shards already in the store as a Cached task run (the store is the cache)."""
    lines = [f"{s.hook}: {len(s.done)} of {len(plan.shards)} shards already stored" for s in plan.sets]
    return Completed(name="Cached" if plan.n_done else "Completed", message="; ".join(lines),
                     data={s.set_id: sorted(w.index for w in s.done) for s in plan.sets})
