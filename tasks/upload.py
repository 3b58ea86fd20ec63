"""Stage 4: write the shard to the store, then its completion record (bytes first, record last)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from actcache import crashpoints
from actcache.extraction import handles, memory
from actcache.extraction.plan import Plan
from actcache.format import layout, records
from actcache.storage.retry import is_transient
from actcache.tasks.refs import PackedRef


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
    key = plan.hook_set(ref.hook).key
    rel = layout.shard_file(ref.index, key.codec)
    store = plan.store
    if ref.n_seq < key.tokens.seqs_per_shard:
        # A partial last shard never replaces a larger one that a run with a higher --max-tokens stored meanwhile
        # (a race that slips past this check is caught by the flow's recheck).
        scan = records.scan_set(store, key)
        if scan.is_done(ref.index, ref.n_seq + 1):
            handles.get(ref.handle).release()  # its buffer goes back (a pinned one to the pool) unwritten
            handles.drop(ref.handle)
            return scan.records[ref.index]
    payload = handles.get(ref.handle)
    store.write_bytes(f"{key.id}/{rel}", payload.data)  # from the buffer it lies in (a retry writes it again)
    crashpoints.point("upload.shard-written")
    record = records.Record(
        ref.index, rel, ref.n_seq, ref.n_seq * key.tokens.context_size, ref.sha256, ref.bytes, ref.extra
    )
    records.write_record(store, key.id, record)
    crashpoints.point("upload.record-written")
    handles.drop(ref.handle)
    payload.release()  # as soon as the record is in: the next shard may reuse a pinned buffer
    memory.release()
    return record
