"""Stage 3: statistics of the shard, then the codec, from the shard file's own buffer."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from actcache.extraction import stages
from actcache.extraction.plan import Plan
from actcache.extraction.refs import ActivationsRef, PackedRef


@task(name="compress", task_run_name="compress-{ref.index:06d}", cache_policy=NO_CACHE)
def compress(plan: Plan, ref: ActivationsRef) -> PackedRef:
    """Encode one shard; record its stats and compression ratio."""
    return stages.compress(plan, ref)
