"""Stage 1: tokenize and pack the dataset into token shards (cached on their own key)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from actcache.extraction import stages
from actcache.extraction.plan import Plan
from actcache.extraction.tokens import ShardWork


@task(name="tokenize", cache_policy=NO_CACHE)
def tokenize(plan: Plan) -> list[ShardWork]:
    """Ensure token shards exist for the target; return the activation shards still to compute."""
    return stages.tokenize(plan)
