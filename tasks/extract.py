"""Stage 2: one forward pass per shard, stopped right after the deepest requested hook."""

from __future__ import annotations

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from actcache import faults, handoff, shard
from actcache.extraction import extractor_for, pick_device
from actcache.plan import Plan, model_for
from actcache.shardfile import ShardFile
from actcache.tokens import ShardWork
from tasks.refs import ActivationsRef


@task(name="extract", cache_policy=NO_CACHE)
def extract(plan: Plan, work: ShardWork) -> list[ActivationsRef]:
    """Compute shard ``work.index`` for every hook still missing it (model loaded once per process)."""
    hooks = [s.hook for s in plan.todo(work)]
    tokens = plan.token_cache().load(work.index)
    if len(tokens) != work.n_seq:
        raise RuntimeError(f"token shard {work.index} holds {len(tokens)} sequences, expected {work.n_seq}")
    cfg = plan.config
    step = extractor_for(model_for(cfg), hooks, batch_size=cfg.batch_size, model_dtype=cfg.model_dtype,
                         device=cfg.device, out_dtype=cfg.dtype)
    pinned = pick_device(cfg.device).startswith("cuda")
    files: dict[str, ShardFile] = {}

    def shard_file(hook: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Where the forward pass writes ``hook``'s activations: the stored file's own buffer."""
        key = plan.hook_set(hook).key
        f = ShardFile({"activations": (shard.TORCH_DTYPES[key.dtype], shape),
                       "tokens": (tokens.dtype, tuple(tokens.shape))},
                      {"set_id": key.id, "hook": key.hook, "index": str(work.index)}, pinned=pinned)
        f.tensors["tokens"].copy_(tokens)
        files[hook] = f
        return f.tensors["activations"]

    finite: dict[str, bool] = {}
    try:
        step(tokens, into=shard_file, finite=finite)
    except BaseException:
        for f in files.values():
            f.release()
        raise
    for h, f in files.items():
        f.source_finite = finite.get(h, True)
    faults.point("extract.forward-done")
    return [ActivationsRef(handoff.put(files[h]), h, work.index, work.n_seq) for h in hooks]
