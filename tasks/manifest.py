"""Consolidate completion records into manifest.json, and publish the run's summary."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from actcache import faults, layout, manifest, records
from actcache.model import hook_layer
from actcache.plan import Plan


@task(name="write-manifest", cache_policy=NO_CACHE)
def write_manifest(plan: Plan) -> list[str]:
    """Write each set's manifest from its completion records (one listing each); return the set URLs."""
    store = plan.store
    target = sum(w.n_seq for w in plan.shards)
    for s in plan.sets:
        store.sweep_temp(s.set_id)  # what killed writers left behind
        scan = records.scan(store, s.set_id, layout.MANIFEST)
        recs = [r for r in scan.sorted_records() if scan.is_done(r.index, r.n_seq)]
        provenance = {**plan.provenance, "hook": s.hook, "layer": hook_layer(s.hook),
                      "hook_shape": list(s.hook_shape) if s.hook_shape else None}
        m = manifest.build(s.key, provenance, recs, target_seqs=target, previous=scan.consolidated)
        faults.point("manifest.before-write")
        store.write_json(f"{s.set_id}/{layout.MANIFEST}", m)
        faults.point("manifest.written")
    return plan.urls


@task(name="summarize", cache_policy=NO_CACHE)
def summarize(plan: Plan, stored: list[records.Record], seconds: float) -> list[dict]:
    """Publish a table artifact: shards total/computed/skipped, tokens, bytes, ratio, tokens/s per set."""
    rows = []
    for s in plan.sets:
        mine = [r for r in stored if r.extra.get("set_id") == s.set_id]
        tokens = sum(r.n_tokens for r in mine)
        raw = sum(r.extra.get("raw_bytes", r.bytes) for r in mine)
        nbytes = sum(r.bytes for r in mine)
        rows.append({
            "set": s.set_id,
            "hook": s.hook,
            "shards_total": len(plan.shards),
            "shards_computed": len(mine),
            "shards_skipped": len(s.done),
            "tokens_computed": tokens,
            "bytes_written": nbytes,
            "compression_ratio": round(raw / nbytes, 3) if nbytes else None,
            "tokens_per_s": round(tokens / seconds, 1) if mine and seconds > 0 else None,
        })
    try:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(key="extraction-summary", table=rows,
                              description=f"{plan.config.model} -> {', '.join(plan.urls)}")
    except Exception:
        pass  # only inside a Prefect run
    return rows
