"""Validate the request and find out what the store already holds."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from actcache.config import ExtractConfig
from actcache.plan import Plan, make_plan


@task(name="plan", cache_policy=NO_CACHE)
def plan_extraction(config: ExtractConfig) -> Plan:
    """Resolve model, dataset and key; list the set's completed shards once."""
    return make_plan(config)


@task(name="skip-cached", cache_policy=NO_CACHE)
def skip_cached(plan: Plan) -> State:
    """Show the shards already in the store as a Cached task run (the store is the cache)."""
    n = len(plan.done)
    message = f"{n} of {len(plan.shards)} shards already in {plan.url}: skipped"
    return Completed(name="Cached" if n else "Completed", message=message,
                     data=sorted(w.index for w in plan.done))
