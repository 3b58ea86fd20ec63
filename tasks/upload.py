"""Stage 4: write the shard to the store, then its completion record (bytes first, record last)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from actcache.extraction import stages
from actcache.extraction.plan import Plan
from actcache.extraction.refs import PackedRef
from actcache.format import records
from actcache.storage.retry import is_transient


def _retry_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except Exception as e:
        return is_transient(e)
    return False


@task(
    name="upload",
    task_run_name="upload-{ref.index:06d}",
    cache_policy=NO_CACHE,
    retries=4,
    retry_delay_seconds=[1, 2, 8, 30],
    retry_condition_fn=_retry_transient,
)
def upload(plan: Plan, ref: PackedRef) -> records.Record:
    """Store shard ``ref.index`` all-or-nothing and mark it done."""
    return stages.upload(plan, ref)
