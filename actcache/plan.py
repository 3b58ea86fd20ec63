"""Resolve and validate everything before anything is written, and work out what is already done.

A plan is small and picklable (it travels between Prefect tasks); the heavy objects it was made from
(model, tokenizer, bridge, source) are cached per process. One plan covers one or more hooks: each
hook is its own set with its own key, and they share the token shards and the forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from actcache import layout, memory, records, sizing
from actcache.config import ExtractConfig
from actcache.errors import ActcacheError
from actcache.extraction import HF_SDPA, extractor_for, forward_engine
from actcache.key import FORMAT_VERSION, SetKey, TokensKey
from actcache.model import ModelSpec, ResolvedModel, check_hook_layer, check_hook_name, resolve_model
from actcache.sources import DatasetSpec, Source, open_source
from actcache.store import Store
from actcache.tokens import ShardWork, TokenCache

_MODELS: dict[tuple, ResolvedModel] = {}


@dataclass(frozen=True)
class HookSet:
    """One hook's set: its key and the shards it already has."""

    key: SetKey
    done: frozenset[ShardWork]
    """Shards already complete in the store (index and size both match)."""
    hook_shape: tuple[int, ...] | None

    @property
    def hook(self) -> str:
        return self.key.hook

    @property
    def set_id(self) -> str:
        return self.key.id


@dataclass(frozen=True)
class Plan:
    config: ExtractConfig
    sets: tuple[HookSet, ...]
    shards: tuple[ShardWork, ...]
    """Every shard the target asks for, with its size (the last may be partial)."""
    partition: tuple[int, int] = (0, 1)
    """(index, count): this run computes only the shards it owns (index % count)."""
    provenance: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def tokens_key(self) -> TokensKey:
        return self.sets[0].key.tokens

    @property
    def store(self) -> Store:
        return Store(self.config.store, self.config.storage_options,
                     credentials_block=self.config.aws_credentials_block)

    @property
    def urls(self) -> list[str]:
        store = self.store
        return [store.url_of(s.set_id) for s in self.sets]

    def owns(self, work: ShardWork) -> bool:
        index, count = self.partition
        return work.index % count == index

    def todo(self, work: ShardWork) -> list[HookSet]:
        """The sets that still need shard ``work`` (empty when done or owned by another partition)."""
        if not self.owns(work):
            return []
        return [s for s in self.sets if work not in s.done]

    @property
    def missing(self) -> list[ShardWork]:
        return [w for w in self.shards if self.todo(w)]

    @property
    def n_done(self) -> int:
        return sum(len(s.done) for s in self.sets)

    def hook_set(self, hook: str) -> HookSet:
        return next(s for s in self.sets if s.hook == hook)

    def token_cache(self) -> TokenCache:
        return TokenCache(self.store, self.tokens_key)


def model_for(cfg: ExtractConfig) -> ResolvedModel:
    spec = ModelSpec(cfg.model, cfg.revision, cfg.trust_remote_code)
    fresh = resolve_model(spec)
    return _MODELS.setdefault((spec, fresh.fingerprint), fresh)  # keeps the loaded tokenizer across plans


def source_for(cfg: ExtractConfig) -> Source:
    if cfg.dataset.startswith("builtin:"):
        from actcache import demo

        if cfg.dataset != demo.DEMO_DATASET:
            raise ActcacheError(f"unknown builtin dataset {cfg.dataset!r}; use {demo.DEMO_DATASET}")
        path = str(demo.demo_corpus())
    else:
        path = cfg.dataset
    source = open_source(DatasetSpec(path, cfg.dataset_config, cfg.split, cfg.dataset_revision, cfg.streaming,
                                     cfg.text_column, cfg.storage_options))
    source.label = cfg.dataset
    return source


def special_ids(cfg: ExtractConfig, model: ResolvedModel) -> tuple[int | None, int | None]:
    """(bos, separator) token ids, checked against what the tokenizer has."""
    tok = model.tokenizer
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if cfg.prepend_bos and bos is None:
        raise ActcacheError(f"the tokenizer of {cfg.model!r} has no BOS token; pass --no-prepend-bos")
    sep = {"eos": tok.eos_token_id, "bos": tok.bos_token_id, "none": None}[cfg.separator]
    if cfg.separator != "none" and sep is None:
        raise ActcacheError(f"the tokenizer of {cfg.model!r} has no {cfg.separator.upper()} token; "
                            "pass --separator none (or another)")
    return bos, sep


def make_plan(cfg: ExtractConfig, *, partition_index: int = 0, num_partitions: int = 1,
              load_model: bool = True) -> Plan:
    """Validate ``cfg`` and list what is done; ``load_model=False`` skips loading the weights (hook names are
    then checked by the runs that compute, and hook shapes come from their records)."""
    if not (num_partitions >= 1 and 0 <= partition_index < num_partitions):
        raise ActcacheError(f"partition {partition_index} of {num_partitions} is invalid; "
                            "need num_partitions >= 1 and 0 <= partition_index < num_partitions")
    if load_model:
        memory.cap_arenas()  # before the pool threads that compress and upload allocate
    store = Store(cfg.store, cfg.storage_options, credentials_block=cfg.aws_credentials_block)
    store.check_writable()
    model = model_for(cfg)
    for hook in cfg.hooks:
        check_hook_layer(hook, model)
    if model.max_context is not None and cfg.context_size > model.max_context:
        raise ActcacheError(f"--context-size {cfg.context_size} is above the maximum of {model.max_context} "
                            f"tokens for {cfg.model!r}; lower --context-size")
    bos, sep = special_ids(cfg, model)
    source = source_for(cfg)
    tkey = TokensKey(dataset=source.fingerprint, tokenizer=model.tokenizer_fingerprint, text_column=cfg.text_column,
                     context_size=cfg.context_size, prepend_bos=cfg.prepend_bos, separator=sep,
                     seqs_per_shard=sizing.seqs_per_shard(cfg, model.config))
    shards = TokenCache(store, tkey).plan(cfg.target_seqs)
    sets = []
    for hook in cfg.hooks:
        key = SetKey(tokens=tkey, model=model.fingerprint, model_dtype=cfg.model_dtype, hook=hook,
                     dtype=cfg.dtype, codec=cfg.codec, codec_level=cfg.level, forward=forward_engine(hook, model))
        scan = records.scan(store, key.id, layout.MANIFEST)
        done = frozenset(w for w in shards if scan.is_done(w.index, w.n_seq, verify=cfg.verify_existing))
        shape = (scan.consolidated or {}).get("hook_shape")
        sets.append(HookSet(key, done, tuple(shape) if shape else None))
    provenance = {
        "model": model.describe(),
        "dataset": source.describe(),
        "tokenization": {"tokenizer": model.tokenizer_fingerprint, "context_size": cfg.context_size,
                         "prepend_bos": cfg.prepend_bos, "bos_id": bos, "separator": cfg.separator,
                         "separator_id": sep},
        "format_version": FORMAT_VERSION,
    }
    plan = Plan(cfg, tuple(sets), tuple(shards), (partition_index, num_partitions), provenance)
    if plan.missing and load_model:
        sizing.check_memory(cfg, max(w.n_seq for w in plan.missing),
                            [sizing.hook_width(h, model.config) for h in cfg.hooks])
        # Work to do: the model is needed anyway, so check the hooks against its real names now. Hooks the
        # hf-sdpa engine serves are valid by their pattern (layer checked above): the bridge loads only for others.
        slow = [h for h in cfg.hooks if forward_engine(h, model) != HF_SDPA]
        bridge = bridge_for(cfg, model) if slow else None
        if bridge is not None:
            names = sorted(bridge.hook_dict)
            for hook in slow:
                check_hook_name(hook, names)
        shapes = extractor_for(model, cfg.hooks, batch_size=1, model_dtype=cfg.model_dtype, device=cfg.device,
                               bridge=bridge).hook_shapes()
        sets = [HookSet(s.key, s.done, tuple(shapes[s.hook])) for s in sets]
        plan = Plan(cfg, tuple(sets), tuple(shards), (partition_index, num_partitions), provenance)
    return plan


def bridge_for(cfg: ExtractConfig, model: ResolvedModel | None = None) -> Any:
    from actcache.extraction import pick_device
    from actcache.model import load_bridge

    return load_bridge(model or model_for(cfg), dtype=cfg.model_dtype, device=pick_device(cfg.device))
