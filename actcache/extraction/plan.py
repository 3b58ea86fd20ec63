"""Resolve and validate everything before anything is written, and work out what is already done.

The config enters once: ``resolve`` looks up every name in it (model id and branch, dataset name, hooks)
and pins the answers in one ``Resolved`` value: commit shas, fingerprints, special token ids, each hook's
engine and shape. Tasks and partitions read that value and never resolve a name again, so a branch that
moves mid-job cannot put other weights under the set id computed here. Nothing here loads weights.

A plan is small and picklable (it travels between Prefect tasks); the heavy objects it was made from
(tokenizer, model) are cached per process by the pinned values. One plan covers one or more hooks: each
hook is its own set with its own key, and they share the token shards and the forward passes.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from actcache.config import ExtractConfig
from actcache.errors import ActcacheError, opt
from actcache.extraction import memory, sizing
from actcache.extraction.engines import HF_SDPA, forward_engine
from actcache.extraction.tokens import ShardRange, ShardWork, TokenCache
from actcache.format import records
from actcache.format.key import FORMAT_VERSION, SetKey, TokensKey
from actcache.inputs.hooks import expand_layers
from actcache.inputs.model import ModelSpec, ResolvedModel, check_hook, check_hook_layer, hook_catalog, resolve_model
from actcache.inputs.sources import DatasetSpec, Source, open_source
from actcache.storage.store import Store, StoreRef

if TYPE_CHECKING:
    from actcache.extraction.forward import MultiExtractor
    from actcache.extraction.selection import Selection


@dataclass(frozen=True)
class Hook:
    """How one requested hook is computed, decided without weights."""

    engine: str
    """``hf-sdpa`` or ``bridge`` (see ``extraction.forward_engine``); part of the set key."""
    shape: tuple[int, ...]
    """Per-token shape of its activation, e.g. ``(d_model,)`` or ``(n_heads, d_head)``."""


@dataclass(frozen=True)
class Resolved:
    """Every name in a config looked up once and pinned: what tasks and partitions read instead of the names."""

    model: ResolvedModel
    """Hub models pinned to a commit sha; local directories to a content fingerprint."""
    dataset: Source
    """Hub datasets pinned to a commit sha; files to their content fingerprint."""
    tokenizer: str
    """Tokenizer fingerprint."""
    bos_id: int | None
    separator_id: int | None
    hooks: dict[str, Hook]
    eos_id: int | None = None
    pad_id: int | None = None
    vocab_size: int | None = None
    """Recorded in the manifest for readers that leave special tokens out (``actcache.read.exclude``)."""
    embedding_rows: int | None = None
    """Token ids the model embeds (None: unknown); the ids a run feeds it are checked against it before writing."""

    @property
    def id_bound(self) -> int | None:
        """Token ids a run may feed the model: below both the tokenizer's and the model's vocabulary."""
        known = [n for n in (self.vocab_size, self.embedding_rows) if n is not None]
        return min(known) if known else None


def resolve(cfg: ExtractConfig, model: ResolvedModel | None = None) -> Resolved:
    """Look up and check every name in ``cfg`` (at most one hub request each for model and dataset), no weights."""
    model = model or resolve_model(ModelSpec(cfg.model, cfg.revision, cfg.trust_remote_code))
    hooks = resolve_hooks(cfg.hooks, model)
    if model.max_context is not None and cfg.context_size > model.max_context:
        raise ActcacheError(
            f"{opt('context_size')} {cfg.context_size} is above the maximum of {model.max_context} "
            f"tokens for {cfg.model!r}; lower {opt('context_size')}"
        )
    bos, sep = special_ids(cfg, model)
    f = model.facts  # the tokenizer's, remembered: no loading
    pad = f["pad_token_id"]
    fed = {"BOS": bos if cfg.prepend_bos else None, "separator": sep, "pad": pad if cfg.packing == "none" else None}
    for what, i in fed.items():
        model.check_embedded(i, f"the tokenizer's {what} token")
    return Resolved(
        model,
        _source(cfg),
        model.tokenizer_fingerprint,
        bos,
        sep,
        hooks,
        f["eos_token_id"],
        pad,
        f["vocab_size"],
        model.embedding_rows,
    )


def resolve_hooks(hooks: Sequence[str], model: ResolvedModel) -> dict[str, Hook]:
    """Each hook's engine and shape; a bad name, layer or shape fails here, before any weight is loaded.

    Residual-stream hooks of the hf-sdpa engine are valid by their pattern and layer (their shape is
    ``(d_model,)``); every other hook is checked against the bridge's catalogue, built without weights.
    """
    engines = {h: forward_engine(h, model) for h in hooks}
    catalog = hook_catalog(model) if any(e != HF_SDPA for e in engines.values()) else None
    out = {}
    for h in hooks:
        if engines[h] == HF_SDPA:
            check_hook_layer(h, model)
            out[h] = Hook(HF_SDPA, (model.d_model,))  # type: ignore[arg-type]
        else:
            out[h] = Hook(engines[h], check_hook(h, model, catalog))  # type: ignore[arg-type]
    if catalog is not None:
        check_width_rule({h: out[h].shape for h in hooks if engines[h] != HF_SDPA}, model)
    return out


def check_width_rule(shapes: dict[str, tuple[int, ...]], model: ResolvedModel) -> None:
    """Readers bound a set by the one table of hook families in ``format.width``, from the model's config.json: a
    hook whose shape (as the bridge gives it) the table would understate is refused here, as every reader would
    refuse its set as forged; one the table cannot derive is said (readers bound its shards by their stored size)."""
    from actcache.format import width
    from actcache.orchestration.logs import run_logger

    config = width.read_config(os.path.join(model.files, "config.json"))
    for hook, shape in shapes.items():
        rule = width.hook_shape(config, hook) if config is not None else None
        if rule is None:
            run_logger().warning(
                "actcache derives no width for hook %r from the config.json of %r: readers of its set bound a shard "
                "by its stored size, not by its key",
                hook,
                model.spec.name,
            )
            continue
        same_axes = len(shape) == len(rule)
        if not (all(map(int.__le__, shape, rule)) if same_axes else math.prod(shape) <= math.prod(rule)):
            raise ActcacheError(
                f"hook {hook!r} of {model.spec.name!r} gives {list(shape)} values per token, more than actcache's "
                f"rule for its hook family derives from config.json ({list(rule)}): every reader would refuse its set "
                "as forged; extract another hook, and report this (actcache.format.width)",
                field="hook",
            )


def _source(cfg: ExtractConfig) -> Source:
    if cfg.dataset.startswith("builtin:"):
        from actcache.inputs import demo

        if cfg.dataset != demo.DEMO_DATASET:
            raise ActcacheError(f"unknown builtin dataset {cfg.dataset!r}; use {demo.DEMO_DATASET}", field="dataset")
        path = str(demo.demo_corpus())
    else:
        path = cfg.dataset
    return open_source(
        DatasetSpec(
            path,
            cfg.dataset_config,
            cfg.split,
            cfg.dataset_revision,
            cfg.streaming,
            cfg.text_column,
            cfg.storage_options,
        ),
        label=cfg.dataset,
    )


def special_ids(cfg: ExtractConfig, model: ResolvedModel) -> tuple[int | None, int | None]:
    """(bos, separator) token ids, checked against what the tokenizer has (its remembered facts: no loading)."""
    bos_id, eos_id = model.facts["bos_token_id"], model.facts["eos_token_id"]
    bos = bos_id if bos_id is not None else eos_id
    if cfg.prepend_bos and bos is None:
        raise ActcacheError(f"the tokenizer of {cfg.model!r} has no BOS token; set {opt('prepend_bos', False)}")
    sep = {"eos": eos_id, "bos": bos_id, "none": None}[cfg.separator]
    if cfg.separator != "none" and sep is None:
        raise ActcacheError(
            f"the tokenizer of {cfg.model!r} has no {cfg.separator.upper()} token; "
            f"set {opt('separator', 'none')} (or another)"
        )
    return bos, sep


@dataclass(frozen=True)
class HookSet:
    """One hook's set: its key and the shards it already has."""

    key: SetKey
    done: frozenset[ShardWork]
    """Shards already complete in the store (index and size both match)."""
    hook_shape: tuple[int, ...]
    stored_as: str | None = None
    """The id of another set that already holds this one's bytes (the same token ids, read from text or from
    ``--token-column``: ``format.content``): it is reused, and nothing is written under ``set_id``."""

    @property
    def hook(self) -> str:
        return self.key.hook

    @property
    def set_id(self) -> str:
        return self.key.id

    @property
    def stored_id(self) -> str:
        """Where this set's bytes are: ``stored_as``, or its own id."""
        return self.stored_as or self.key.id


@dataclass(frozen=True)
class Plan:
    config: ExtractConfig
    resolved: Resolved
    sets: tuple[HookSet, ...]
    shards: ShardRange
    """Every shard the target asks for, with its size (the last may be partial); until the dataset's end is known
    (``shards.known``), every shard the target could fill."""
    partition: tuple[int, int] = (0, 1)
    """(index, count): this run computes only the shards it owns (index % count)."""

    @property
    def pinned_config(self) -> ExtractConfig:
        """The config with hub names pinned to the commits resolved here: what partitions and the flow get,
        so that they compute exactly these sets even if a branch moves meanwhile."""
        r = self.resolved
        return self.config.replace(
            revision=r.model.revision or self.config.revision,
            dataset_revision=r.dataset.spec.revision or self.config.dataset_revision,
        )

    @property
    def provenance(self) -> dict[str, Any]:
        """What every manifest of this plan records about its inputs."""
        r, cfg = self.resolved, self.config
        return {
            "model": r.model.describe(),
            **({"model_config": w} if (w := r.model.config_witness()) else {}),
            "dataset": r.dataset.describe(),
            "tokenization": {
                "tokenizer": r.tokenizer,
                "context_size": cfg.context_size,
                "prepend_bos": cfg.prepend_bos,
                "bos_id": r.bos_id,
                "separator": cfg.separator,
                "separator_id": r.separator_id,
                "eos_id": r.eos_id,
                "pad_id": r.pad_id,
                "vocab_size": r.vocab_size,
            },
            "format_version": FORMAT_VERSION,
        }

    @property
    def tokens_key(self) -> TokensKey:
        return self.sets[0].key.tokens

    @property
    def store_ref(self) -> StoreRef:
        return self.config.store_ref

    @property
    def store(self) -> Store:
        return self.store_ref.open()

    @property
    def refs(self) -> list[StoreRef]:
        """Each set's ref (URL, options, credentials block): what ``open_set`` takes to read it anywhere."""
        return [self.store_ref.child(s.stored_id) for s in self.sets]

    @property
    def computed(self) -> tuple[HookSet, ...]:
        """The sets this plan writes (not those reused from another set that holds the same bytes)."""
        return tuple(s for s in self.sets if s.stored_as is None)

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.refs]

    def owns(self, work: ShardWork) -> bool:
        index, count = self.partition
        return work.index % count == index

    def todo(self, work: ShardWork) -> list[HookSet]:
        """The sets that still need shard ``work`` (empty when done or owned by another partition)."""
        if not self.owns(work):
            return []
        return [s for s in self.sets if work not in s.done]

    def iter_missing(self) -> Iterator[ShardWork]:
        return (w for w in self.shards if self.todo(w))

    @property
    def missing(self) -> list[ShardWork]:
        """This run's shards still to compute: as many as the target names until the dataset's end is known (use
        ``has_missing`` there)."""
        return list(self.iter_missing())

    @property
    def has_missing(self) -> bool:
        return next(self.iter_missing(), None) is not None

    def refreshed(self) -> Plan:
        """This plan as the store holds it now: its shards up to where the dataset ends (once tokenized)."""
        store = self.store
        shards = self.token_cache().plan(self.config.target_seqs)
        sets = tuple(
            s
            if s.stored_as
            else HookSet(s.key, frozenset(records.scan_set(store, s.key).done_of(shards)), s.hook_shape)
            for s in self.sets
        )
        return dataclasses.replace(self, sets=sets, shards=shards)

    @property
    def n_done(self) -> int:
        return sum(len(s.done) for s in self.sets)

    def hook_set(self, hook: str) -> HookSet:
        return next(s for s in self.sets if s.hook == hook)

    def token_cache(self) -> TokenCache:
        return TokenCache(self.store, self.tokens_key, self.resolved.vocab_size, self.resolved.model)

    def documents(self) -> tuple[Callable[[], Iterable[Any]], Any]:
        """What the token cache packs: (the dataset's texts, the tokenizer), or with ``--token-column`` (each row's
        token ids, checked against the vocabulary, None): the same ids pack into the same sequences."""
        r, column = self.resolved, self.config.token_column
        if not column:
            return r.dataset.texts, r.model.tokenizer
        from actcache.extraction.examples import token_docs

        return functools.partial(token_docs, r.dataset, column, r.id_bound), None

    def check_documents(self) -> None:
        """Fail, in one line, unless the dataset has a document to pack (text, or ids in ``--token-column``)."""
        if not self.config.token_column:
            self.resolved.dataset.check()
            return
        texts, _ = self.documents()
        for _ in texts():
            return
        raise ActcacheError(
            f"dataset {self.resolved.dataset.label!r} has no token ids in column {self.config.token_column!r}"
        )

    def load_model(self) -> None:
        """What ``make_plan(load_model=True)`` adds, for a plan made without: the device checked and, when there is
        work, the memory its shards need checked and the weights loaded (the extract task finds them loaded)."""
        _prepare_device(self.config)
        self._load_weights()

    def check_memory(self) -> bool:
        """Refuse (``ActcacheError``) shards that do not fit this machine's memory; whether there is work at all.
        Needs no torch: the API runs it before it says it is loading anything."""
        first_two = list(itertools.islice(self.iter_missing(), 2))  # only the last shard may be partial
        if first_two:
            widths = [math.prod(self.resolved.hooks[h].shape) for h in self.config.hooks]
            sizing.check_memory(self.config, max(w.n_seq for w in first_two), widths)
        return bool(first_two)

    def _load_weights(self) -> None:
        if self.check_memory():
            self.extractor(self.config.hooks)

    def selection(self, hook: str) -> Selection:
        """The heads and dims of ``hook`` this plan's sets keep (``--heads``, ``--dims``)."""
        return hook_selection(self.config, hook, self.hook_set(hook).hook_shape)

    def kept_shape(self, hook: str) -> tuple[int, ...]:
        """``hook``'s per-token shape as stored: its full shape less the heads and dims not kept."""
        return self.selection(hook).kept_shape

    def extractor(self, hooks: Sequence[str]) -> MultiExtractor:
        """The forward pass for ``hooks``, on the pinned model and engines (weights loaded once per process)."""
        from actcache.extraction.forward import extractor_for

        cfg = self.config
        return extractor_for(
            self.resolved.model,
            hooks,
            engines={h: self.resolved.hooks[h].engine for h in hooks},
            batch_size=cfg.batch_size,
            model_dtype=cfg.model_dtype,
            device=cfg.device,
            out_dtype=cfg.dtype,
        )


def make_plan(
    cfg: ExtractConfig, *, partition_index: int = 0, num_partitions: int = 1, load_model: bool = True
) -> Plan:
    """Validate ``cfg``, resolve it once, and list what is done.

    Every check runs without weights. ``load_model`` loads them too when there is work (so they load while
    Prefect's server starts); a fan-out parent passes False, and so does a request that may have nothing to do
    (``Plan.load_model`` then loads them once it knows).
    """
    if not (num_partitions >= 1 and 0 <= partition_index < num_partitions):
        raise ActcacheError(
            f"partition {partition_index} of {num_partitions} is invalid; "
            "need num_partitions >= 1 and 0 <= partition_index < num_partitions"
        )
    if load_model:
        _prepare_device(cfg)
    store = cfg.store_ref.open()
    if not (store.local and os.path.isdir(store.root)):  # unreachable, a file, a new folder that cannot be made:
        store.check_writable()  # said now; an existing folder is checked once it is known to need writes (below)
    model = resolve_model(ModelSpec(cfg.model, cfg.revision, cfg.trust_remote_code))
    hooks = expand_layers(cfg.hooks, model)  # blocks.*.X: one hook per block from here on, as if listed
    if hooks != cfg.hooks:
        cfg = dataclasses.replace(cfg, hook=",".join(hooks))
    r = resolve(cfg, model)
    widths = [math.prod(r.hooks[h].shape) for h in cfg.hooks]  # values per token of each hook
    tkey = TokensKey(
        dataset=r.dataset.fingerprint,
        tokenizer=r.tokenizer,
        text_column=cfg.text_column,
        context_size=cfg.context_size,
        prepend_bos=cfg.prepend_bos,
        separator=r.separator_id,
        seqs_per_shard=sizing.seqs_per_shard(cfg, widths),
        **examples_tokens_fields(cfg),
    )
    tokens = TokenCache(store, tkey)
    tscan = tokens.scan()
    shards = tokens.plan(cfg.target_seqs, tscan)
    text_needed = cfg.packing == "concat" and not all(tscan.is_done(w.index, w.n_seq) for w in shards)
    sets = []
    for hook in cfg.hooks:
        key = SetKey(
            tokens=tkey,
            model=r.model.fingerprint,
            model_dtype=cfg.model_dtype,
            hook=hook,
            dtype=cfg.dtype,
            codec=cfg.codec,
            codec_level=cfg.level,
            forward=r.hooks[hook].engine,
            **examples_set_fields(cfg),
            **hook_selection(cfg, hook, r.hooks[hook].shape).key_fields(),
        )
        shape = r.hooks[hook].shape  # --verify-existing also checks each shard's header against the key and it
        kept = math.prod(hook_selection(cfg, hook, shape).kept_shape)
        scan = records.scan_set(store, key, read_all=cfg.verify_existing, record_limit=records.record_cap(kept))
        scan.bounds = records.Bounds.of(key, d=kept)
        sets.append(HookSet(key, frozenset(scan.done_of(shards, verify=cfg.verify_existing)), shape))
    plan = Plan(cfg, r, tuple(sets), shards, (partition_index, num_partitions))
    if text_needed:
        # Text will be read: make sure there is some (stored tokens need none, nor the hub). One example per
        # sequence: ``examples.prepare`` reads and checks every row instead.
        plan.check_documents()
    if cfg.packing == "none" and plan.has_missing:
        from actcache.extraction import examples, reuse

        ex = examples.prepare(plan, cfg.target_seqs)  # columns and lengths checked before Prefect starts (kept)
        plan = reuse.stored(plan, ex)  # a set that holds the same token ids (read another way) is not computed again
    elif plan.has_missing and shards.known:  # packed, its token shards stored: the same check as after tokenizing
        from actcache.extraction import reuse

        plan = reuse.packed(plan, tscan)
    if plan.has_missing:  # a complete set reads from a read-only store: only work to do needs a writable one
        store.check_writable()
    if load_model:
        plan._load_weights()  # now, while Prefect's server starts; the extract task finds them loaded
    return plan


def examples_tokens_fields(cfg: ExtractConfig) -> dict[str, Any]:
    """The token key's fields for one sequence per example, and ``token_column`` (none for packed sets from text:
    their ids stay the same)."""
    if cfg.packing != "none":
        return {"token_column": cfg.token_column} if cfg.token_column else {}
    return {"packing": "none", "truncate": cfg.truncate, "token_column": cfg.token_column}


def examples_set_fields(cfg: ExtractConfig) -> dict[str, Any]:
    """The set key's fields for one sequence per example: the canonical positions and the kept columns."""
    if cfg.packing != "none":
        return {}
    from actcache.extraction.positions import parse

    return {"positions": parse(cfg.positions, cfg.context_size).text, "keep_columns": ",".join(cfg.kept_columns)}


def hook_selection(cfg: ExtractConfig, hook: str, shape: tuple[int, ...]) -> Selection:
    """The heads and dimensions of ``hook`` kept (``extraction.selection``), checked against its shape."""
    from actcache.extraction.selection import select

    return select(hook, shape, cfg.heads, cfg.dims)


def _prepare_device(cfg: ExtractConfig) -> None:
    from actcache.extraction.forward import pick_device  # here: planning what is done needs no torch

    memory.cap_arenas()  # before the pool threads that compress and upload allocate
    pick_device(cfg.device)  # a bogus or absent device fails here, before anything is written
