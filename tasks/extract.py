"""Stage 2: one forward pass per shard, stopped right after the deepest requested hook."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from actcache.extraction import stages
from actcache.extraction.plan import Plan
from actcache.extraction.refs import ActivationsRef
from actcache.extraction.tokens import ShardWork


@task(name="extract", task_run_name="extract-{work.index:06d}", cache_policy=NO_CACHE)
def extract(plan: Plan, work: ShardWork) -> list[ActivationsRef]:
    """Compute shard ``work.index`` for every hook still missing it (model loaded once per process)."""
    return stages.extract(plan, work)
