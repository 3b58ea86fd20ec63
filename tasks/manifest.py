"""Consolidate completion records into manifest.json, and publish the run's summary."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from actcache import layout, manifest, records
from actcache.plan import Plan


@task(name="write-manifest", cache_policy=NO_CACHE)
def write_manifest(plan: Plan) -> str:
    """Write the set's manifest from its completion records (one listing); return the set URL."""
    store, set_id = plan.store, plan.set_id
    scan = records.scan(store, set_id, layout.MANIFEST)
    recs = [r for r in scan.sorted_records() if scan.is_done(r.index, r.n_seq)]
    m = manifest.build(plan.key, plan.provenance, recs, target_seqs=sum(w.n_seq for w in plan.shards),
                       previous=scan.consolidated)
    store.write_json(f"{set_id}/{layout.MANIFEST}", m)
    return plan.url


@task(name="summarize", cache_policy=NO_CACHE)
def summarize(plan: Plan, stored: list[records.Record], seconds: float) -> dict:
    """Publish a table artifact: shards total/computed/skipped, tokens, bytes, ratio, tokens/s."""
    tokens = sum(r.n_tokens for r in stored)
    raw = sum(r.extra.get("raw_bytes", r.bytes) for r in stored)
    nbytes = sum(r.bytes for r in stored)
    row = {
        "set": plan.set_id,
        "shards_total": len(plan.shards),
        "shards_computed": len(stored),
        "shards_skipped": len(plan.done),
        "tokens_computed": tokens,
        "bytes_written": nbytes,
        "compression_ratio": round(raw / nbytes, 3) if nbytes else None,
        "tokens_per_s": round(tokens / seconds, 1) if stored and seconds > 0 else None,
    }
    try:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(key="extraction-summary", table=[row],
                              description=f"{plan.config.model} {plan.config.hook} -> {plan.url}")
    except Exception:
        pass  # only inside a Prefect run
    return row
