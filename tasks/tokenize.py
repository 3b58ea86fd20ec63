"""Stage 1: tokenize and pack the dataset into token shards (cached on their own key)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from actcache.plan import Plan, model_for, source_for, special_ids
from actcache.tokens import ShardWork


@task(name="tokenize", cache_policy=NO_CACHE)
def tokenize(plan: Plan) -> list[ShardWork]:
    """Ensure token shards exist for the target; return the activation shards still to compute."""
    cfg = plan.config
    if not plan.missing and not cfg.verify_existing:
        return []  # nothing to compute: the token cache is not even opened
    model = model_for(cfg)
    bos, sep = special_ids(cfg, model)
    feed = {w.index for w in plan.missing}  # the token shards this run feeds to the model: re-hashed first
    shards = plan.token_cache().ensure(cfg.target_seqs, source_for(cfg).texts, model.tokenizer, sep, bos,
                                       check=None if cfg.verify_existing else feed)
    return [w for w in shards if plan.todo(w)]
