"""Stage 2: the forward pass, stopped right after the hook, for one shard's token sequences."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from actcache import handoff
from actcache.extraction import Extractor
from actcache.plan import Plan, bridge_for
from actcache.tokens import ShardWork
from tasks.refs import ActivationsRef


@task(name="extract", cache_policy=NO_CACHE)
def extract(plan: Plan, work: ShardWork) -> ActivationsRef:
    """Compute the hook's activations for shard ``work.index`` (model loaded once per process)."""
    tokens = plan.token_cache().load(work.index)
    if len(tokens) != work.n_seq:
        raise RuntimeError(f"token shard {work.index} holds {len(tokens)} sequences, expected {work.n_seq}")
    extractor = Extractor(bridge_for(plan.config), plan.config.hook, batch_size=plan.config.batch_size)
    acts = extractor(tokens)
    shape = tuple(plan.provenance.get("hook_shape") or acts.shape[2:])
    return ActivationsRef(handoff.put((tokens, acts)), work.index, work.n_seq, shape)
