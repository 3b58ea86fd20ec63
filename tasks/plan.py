"""Validate the request and find out what the store already holds."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from actcache.config import ExtractConfig
from actcache.extraction import stages
from actcache.extraction.plan import Plan
from actcache.extraction.tokens import ShardWork


@task(name="plan", cache_policy=NO_CACHE)
def plan_extraction(config: ExtractConfig, partition_index: int = 0, num_partitions: int = 1) -> Plan:
    """Resolve model, dataset and keys; list each set's completed shards once (or take the request's plan)."""
    return stages.plan(config, partition_index, num_partitions)


@task(name="skip-cached", cache_policy=NO_CACHE)
def skip_cached(plan: Plan) -> State:
    """Show the shards already in the store as a Cached task run (the store is the cache)."""
    stored = stages.already_stored(plan)
    return Completed(name="Cached" if stored.cached else "Completed", message=stored.message, data=stored.done)


@task(name="recheck", cache_policy=NO_CACHE)
def recheck(plan: Plan, last: bool) -> tuple[Plan, list[ShardWork]]:
    """The plan as the store is now, and this run's shards that are no longer done (see ``stages.recheck``)."""
    return stages.recheck(plan, last)


@task(name="reuse-stored", cache_policy=NO_CACHE)
def reuse_stored(plan: Plan, work: list[ShardWork]) -> tuple[Plan, list[ShardWork]]:
    """Reuse a set that holds the same token ids read another way (text or a token column; ``stages.reuse_stored``)."""
    return stages.reuse_stored(plan, work)
