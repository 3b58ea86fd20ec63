"""Validate the request and find out what the store already holds."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from actcache.config import ExtractConfig
from actcache.errors import Failure
from actcache.extraction.plan import Plan, make_plan
from actcache.extraction.tokens import ShardWork


@task(name="plan", cache_policy=NO_CACHE)
def plan_extraction(config: ExtractConfig, partition_index: int = 0, num_partitions: int = 1) -> Plan:
    """Resolve model, dataset and keys; list each set's completed shards once."""
    return make_plan(config, partition_index=partition_index, num_partitions=num_partitions)


@task(name="skip-cached", cache_policy=NO_CACHE)
def skip_cached(plan: Plan) -> State:
    """Show the shards already in the store as a Cached task run (the store is the cache)."""
    n = len(plan.shards)
    lines = [
        f"{s.hook}: {len(s.done)} of {n} shards already stored"
        if plan.shards.known
        else f"{s.hook}: {len(s.done)} shards already stored, of up to {n} (where the dataset ends is not known yet)"
        for s in plan.sets
    ]
    return Completed(
        name="Cached" if plan.n_done else "Completed",
        message="; ".join(lines),
        data={s.set_id: sorted(w.index for w in s.done) for s in plan.sets},
    )


@task(name="recheck", cache_policy=NO_CACHE)
def recheck(plan: Plan, last: bool) -> tuple[Plan, list[ShardWork]]:
    """The plan as the store is now, and this run's shards that are no longer done.

    Runs of one set with different --max-tokens may run at once: the lower one's partial last shard can land
    over the higher one's full shard (or its record over the other's bytes) in a race. Each run then computes
    what it misses again: a partial shard never replaces a larger one that is in place, so this converges to
    the largest; ``last`` fails the run instead (a rerun resumes).
    """
    fresh = plan.refreshed()  # where the data ends is known by now
    again = fresh.missing
    if again and last:
        raise Failure(
            f"shards {[w.index for w in again][:10]} of {', '.join(plan.urls)} kept being replaced by "
            "concurrent runs; rerun the same command"
        )
    return fresh, again
