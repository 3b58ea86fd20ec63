"""Model resolution (fingerprint, config, tokenizer) and the once-per-process TransformerBridge.

Resolution reads only small files (config, tokenizer, weight hashes memoised by path/size/mtime), so a
complete set is recognised without loading any weights.
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import json
import os
import re
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from actcache.errors import ActcacheError, opt
from actcache.inputs import fingerprint, hub

BUILTIN_PREFIX = "builtin:"
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "config.json")
_SMALL_FILES = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py", "*.vocab")
"""A hub commit's files that config, tokenizer and remote code read (no weights)."""
_HUB_WEIGHTS = ("*.safetensors", "*.bin")
"""The weight formats fetched from a hub commit, in order of preference (only the first the commit has)."""
_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")
_FACTS_VERSION = 3  # bump when ResolvedModel._read_facts changes what it returns


@dataclass(frozen=True)
class ModelSpec:
    name: str
    """HF hub id, local directory written by ``save_pretrained``, or ``builtin:tiny-gpt2``."""
    revision: str | None = None
    trust_remote_code: bool = False


@dataclass(frozen=True)
class ResolvedModel:
    """A model located and pinned, weights not loaded: small, picklable, and what a plan carries.

    A hub model is pinned to its commit sha (``revision``), a local directory to a content fingerprint of its
    weights and config. What it loads (config, tokenizer) is cached per process by this value, so whoever
    holds it (a task, a partition) reads the same commit without asking the hub again.
    """

    spec: ModelSpec
    source: str
    """What transformers loads from: the local directory, or the hub id."""
    fingerprint: str
    """``hf:<commit sha>`` or ``local:<content hash>``: the model's part of every set key."""
    revision: str | None
    """The hub commit sha (None for a local directory)."""
    inputs: str = ""
    """Content hash of a local directory's other files (config, tokenizer, code): what ``facts`` are read from
    besides the weights. Empty for a hub model: its commit fixes them."""

    @property
    def facts(self) -> dict[str, Any]:
        """What a plan needs of the config and tokenizer: layers, width, context limit, architecture, tokenizer
        fingerprint, special ids and vocabulary size. Kept on disk under a hash of what they are read from (weights
        fingerprint or commit, other files, transformers and tokenizers versions), so a rerun plans without
        importing transformers or loading either."""

        def remembered() -> dict[str, Any]:
            from importlib.metadata import version

            key = fingerprint.combine(
                {
                    "facts": _FACTS_VERSION,
                    "model": self.fingerprint,
                    "files": self.inputs,
                    "trust_remote_code": self.spec.trust_remote_code,
                    "transformers": version("transformers"),
                    "tokenizers": version("tokenizers"),
                }
            )
            return fingerprint.remembered("model-facts", key, self._read_facts)

        return _loaded(self, "facts", remembered)

    def _read_facts(self) -> dict[str, Any]:
        facts = {
            "n_layers": self._cfg("num_hidden_layers", "n_layer", "num_layers"),  # the config first: its
            "d_model": self._cfg("hidden_size", "n_embd", "d_model"),  # errors say more than the tokenizer's
            "max_context": self._cfg("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"),
            "model_type": getattr(self.config, "model_type", None),
        }
        tok = self.tokenizer
        return {
            **facts,
            "tokenizer_fingerprint": _tokenizer_fingerprint(tok),
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "vocab_size": len(tok),
        }

    @property
    def config(self) -> Any:
        def load() -> Any:
            from transformers import AutoConfig

            try:
                return AutoConfig.from_pretrained(self.files, trust_remote_code=self.spec.trust_remote_code)
            except Exception as e:  # a broken or foreign config.json, an unknown model_type, ...
                raise ActcacheError(
                    f"model {self.spec.name!r} has no usable config.json ({_first_line(e)}); "
                    "write the folder with save_pretrained or pass an HF model id"
                ) from e

        return _loaded(self, "config", load)

    def _cfg(self, *names: str) -> int | None:
        cfg = getattr(self.config, "text_config", None) or self.config
        for n in names:
            v = getattr(cfg, n, None)
            if isinstance(v, int):
                return v
        return None

    @property
    def n_layers(self) -> int | None:
        return self.facts["n_layers"]

    @property
    def d_model(self) -> int | None:
        return self.facts["d_model"]

    @property
    def max_context(self) -> int | None:
        return self.facts["max_context"]

    @property
    def model_type(self) -> str | None:
        return self.facts["model_type"]

    @property
    def tokenizer(self) -> Any:
        def load() -> Any:
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(self.files, trust_remote_code=self.spec.trust_remote_code)
            except Exception as e:
                raise ActcacheError(f"model {self.spec.name!r} has no loadable tokenizer ({_first_line(e)})") from e
            check_tokenizer(tok, self.spec.name)
            return tok

        return _loaded(self, "tokenizer", load)

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.facts["tokenizer_fingerprint"]

    @property
    def files(self) -> str:
        """The folder config and tokenizer are read from: the local directory, or the hub commit's small files
        in the HF cache (fetched once; then read with no request, the hub reachable or not).

        Loading by hub id instead asks the hub again on every load (transformers lists the repo's chat
        templates, TransformerLens reloads the tokenizer by its name), retrying for about 23 s each when it
        does not answer.
        """
        if self.revision is None:
            return self.source
        return _loaded(self, "files", lambda: _snapshot(self, _SMALL_FILES))

    def weights(self) -> str:
        """The folder weights are loaded from: the local directory, or the hub commit's files with its weights
        (safetensors if it has them, else .bin) in the HF cache, fetched once."""
        if self.revision is None:
            return self.source

        def fetch() -> str:
            for pattern in _HUB_WEIGHTS:
                folder = _snapshot(self, (*_SMALL_FILES, pattern))
                if glob.glob(os.path.join(folder, pattern)):
                    return folder
            raise ActcacheError(
                f"model {self.spec.name!r} has no weight files (*.safetensors, *.bin) at commit {self.revision}"
            )

        return _loaded(self, "weights", fetch)

    @property
    def pin(self) -> tuple[str, str, str | None, bool, str]:
        """What identifies the loaded objects: the same commit typed as ``main`` or as its sha loads once (a local
        folder whose tokenizer or config files changed is another)."""
        return self.source, self.fingerprint, self.revision, self.spec.trust_remote_code, self.inputs

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "revision": self.revision,
            "fingerprint": self.fingerprint,
            "trust_remote_code": self.spec.trust_remote_code,
        }

    def check_unchanged(self) -> None:
        """Refuse to go on if a local directory's weights changed since this model was pinned.

        Called after weights are loaded: what was loaded must be what the set key names. (A hub model is
        loaded by its commit sha, which cannot change.)
        """
        if self.revision is None and os.path.isdir(self.source):
            now = _local_fingerprint(self.source)
            if now != self.fingerprint:
                raise ActcacheError(
                    f"model directory {self.spec.name!r} changed while this run used it "
                    f"({self.fingerprint} -> {now}); rerun: the new weights get a set of their own"
                )


_HEAVY: dict[tuple[tuple, str], Any] = {}
_HEAVY_LOCK = threading.RLock()  # a load may need another (the tokenizer fingerprint, the tokenizer)


def _loaded(model: ResolvedModel, what: str, load: Any) -> Any:
    """``load()`` once per process for this pinned model (tasks and plans share the loaded tokenizer)."""
    with _HEAVY_LOCK:
        if (model.pin, what) not in _HEAVY:
            _HEAVY[(model.pin, what)] = load()
        return _HEAVY[(model.pin, what)]


def _snapshot(model: ResolvedModel, patterns: Sequence[str]) -> str:
    """The local folder of ``model``'s hub commit holding the files that match ``patterns``.

    huggingface_hub keeps the commit's file listing in its cache: once the files are there, this asks nothing,
    and with the hub unreachable it answers from the cache when the listing says the files are all there.
    """
    from huggingface_hub import snapshot_download

    try:
        return hub.with_backoff(
            lambda: snapshot_download(model.source, revision=model.revision, allow_patterns=list(patterns))
        )
    except Exception as e:
        raise ActcacheError(
            f"cannot fetch the files of model {model.spec.name!r} at commit {model.revision}: they "
            f"are not all in the HF cache and {hub.why(e)}; check network access"
        ) from e


def _tokenizer_fingerprint(tok: Any) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    body = {
        "backend": backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items())),
        "special": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())},
        "bos": tok.bos_token_id,
        "eos": tok.eos_token_id,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]


PROBE_TEXT = "The quick brown fox jumps over the lazy dog: 1234567890."


def check_tokenizer(tok: Any, name: str) -> None:
    """Refuse a tokenizer that cannot tokenize, before anything is written.

    A model folder without tokenizer files still loads one (transformers builds it empty): every text then
    becomes no tokens at all and the set silently holds nothing but separators. A plain English probe must give
    at least two distinct ids and decode back to itself (ignoring case and spaces, which some tokenizers change).
    """

    def squeeze(t: str) -> str:
        return "".join(t.split()).lower()

    why = None
    try:
        ids = tok(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        back = tok.decode(ids, skip_special_tokens=True) if ids else ""
    except Exception as e:
        why = f"it fails on plain text ({_first_line(e)})"
    else:
        if len(set(ids)) < 2:
            why = f"it turns {PROBE_TEXT!r} into {len(ids)} ids, {len(set(ids))} distinct"
        elif squeeze(back) != squeeze(PROBE_TEXT):
            why = f"{PROBE_TEXT!r} decodes back as {back[:80]!r}"
    if why:
        raise ActcacheError(
            f"the tokenizer of {name!r} cannot tokenize: {why}; is the folder missing its tokenizer "
            "files (tokenizer.json, vocab/merges)? save them with tokenizer.save_pretrained"
        )


def _first_line(e: BaseException) -> str:
    return hub.first_line(e)


def _local_fingerprint(path: str) -> str:
    files = sorted({f for g in _WEIGHT_GLOBS for f in glob.glob(os.path.join(path, g))})
    parts = {os.path.basename(f): fingerprint.file_sha256(f) for f in files}
    return "local:" + fingerprint.combine(parts)[:40]


def resolve_model(spec: ModelSpec) -> ResolvedModel:
    """Locate and pin ``spec``: a local directory by its content, a hub id by its commit (one request at most)."""
    name = spec.name
    if name.startswith(BUILTIN_PREFIX):
        from actcache.inputs import demo

        name = str(demo.builtin_model(name[len(BUILTIN_PREFIX) :]))
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        files = [f for g in _WEIGHT_GLOBS for f in glob.glob(os.path.join(path, g))]
        if not any(not f.endswith("config.json") for f in files):
            raise ActcacheError(
                f"model directory {name!r} has no weight files (*.safetensors, *.bin); "
                "write it with save_pretrained or pass an HF model id"
            )
        weights = {f for g in _WEIGHT_GLOBS for f in glob.glob(os.path.join(path, g))}
        others = sorted(f for f in glob.glob(os.path.join(path, "*")) if os.path.isfile(f) and f not in weights)
        around = {
            os.path.basename(f): fingerprint.file_sha256(f)
            for f in [*others, os.path.join(path, "config.json")]
            if os.path.exists(f)
        }  # tokenizer files, config, code: what facts are read from besides weights
        return ResolvedModel(spec, path, _local_fingerprint(path), None, inputs=fingerprint.combine(around))
    if path.startswith(("/", ".", "~")) or os.path.exists(path):
        raise ActcacheError(
            f"model {name!r} not found: no such directory; pass an HF model id or a "
            "directory written by save_pretrained"
        )
    sha, err = hub.commit(name, spec.revision, "model")
    if sha is None:
        raise ActcacheError(
            f"model {name!r} not found: not a local directory, not in the HF cache, and "
            f"{hub.why(err)}; check {opt('model')} and {opt('revision')}, or network access"
        )
    return ResolvedModel(spec, name, "hf:" + sha, sha)


# -- hooks -------------------------------------------------------------------------------------
def hook_layer(hook: str) -> int | None:
    """Block index a hook belongs to (None for embedding / final-norm hooks)."""
    m = _LAYER_RE.match(hook)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class HookCatalog:
    """The hooks a model's bridge offers, found without its weights (see ``hook_catalog``)."""

    names: tuple[str, ...]
    """Every hook name (TransformerLens names and bridge aliases), sorted."""
    per_token: dict[str, tuple[int, ...]]
    """Hooks that give one vector per token, with that vector's shape (e.g. ``(d_model,)``, ``(n_heads, d_head)``)."""
    other: dict[str, str]
    """Every other hook, with why it cannot be extracted (its shape, or that it did not fire)."""


_PROBES = ((2, 5), (2, 7))  # two lengths: an attention pattern [batch, heads, pos, pos] cannot pass for per-token
_CATALOGS: dict[tuple, HookCatalog] = {}


def hook_catalog(model: ResolvedModel) -> HookCatalog:
    """Every hook of ``model`` and the per-token shape of each, from a bridge built without weights.

    Memoised per process and on disk (by model fingerprint and library versions), so a fan-out parent or a
    rerun pays for it once. The bridge is built on the ``meta`` device (no memory, any size); architectures
    whose boot must read weights (TransformerLens splits fused QKV projections, e.g. GPT-2's) are built from
    their config on the CPU instead, with random weights and two blocks (the others' hooks follow when both
    are alike; else the whole model, once).
    """
    with _HEAVY_LOCK:
        if model.pin in _CATALOGS:
            return _CATALOGS[model.pin]
    path = _catalog_path(model)
    try:
        data = json.loads(path.read_text())
        catalog = HookCatalog(
            tuple(data["names"]), {k: tuple(v) for k, v in data["per_token"].items()}, dict(data["other"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        catalog = _probe_catalog(model)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"names": catalog.names, "per_token": catalog.per_token, "other": catalog.other}))
            os.replace(tmp, path)
        except OSError:
            pass  # the memo is an optimisation only
    with _HEAVY_LOCK:
        return _CATALOGS.setdefault(model.pin, catalog)


def _catalog_path(model: ResolvedModel) -> Any:
    from importlib import metadata

    versions = [metadata.version(p) for p in ("transformer-lens", "transformers")]
    key = json.dumps([model.fingerprint, model.spec.trust_remote_code, versions])
    return fingerprint.cache_dir() / "hooks" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")


def _probe_catalog(model: ResolvedModel) -> HookCatalog:
    import torch

    try:
        with torch.device("meta"):
            return _probe(_skeleton(model), "meta")
    except ActcacheError:
        raise
    except Exception:
        pass  # TransformerLens had to read a weight, or an op has no meta kernel: build it for real instead
    try:
        # Real (random) weights cost memory: two blocks tell every block's hooks when the blocks are alike.
        field = getattr(type(model.config), "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")
        n = model.n_layers
        if n and n > 2 and getattr(model.config, "text_config", None) is None and hasattr(model.config, field):
            grown = _grow(_probe(_skeleton(model, {field: 2}).eval(), "cpu"), n)
            if grown is not None:
                return grown
        return _probe(_skeleton(model).eval(), "cpu")
    except ActcacheError:
        raise
    except Exception as e:
        raise ActcacheError(f"cannot build model {model.spec.name!r} with TransformerLens ({_first_line(e)})") from e


def _grow(two: HookCatalog, n_layers: int) -> HookCatalog | None:
    """The catalogue of ``n_layers`` alike blocks from one of two blocks; None when blocks 0 and 1 differ."""

    def block(name: str) -> tuple[int | None, str]:
        m = _LAYER_RE.match(name)
        return (int(m.group(1)), name[m.end() :]) if m else (None, name)

    views = []
    for i in (0, 1):
        views.append(
            {
                rest: (two.per_token.get(n), two.other.get(n))
                for n in two.names
                for layer, rest in [block(n)]
                if layer == i
            }
        )
    if views[0] != views[1]:
        return None
    names, per_token, other = [], {}, {}
    for n in two.names:
        layer, rest = block(n)
        if layer == 1:
            continue
        for full in [n] if layer is None else [f"blocks.{i}.{rest}" for i in range(n_layers)]:
            names.append(full)
            if n in two.per_token:
                per_token[full] = two.per_token[n]
            else:
                other[full] = two.other[n]
    return HookCatalog(tuple(sorted(names)), per_token, other)


def _skeleton(model: ResolvedModel, overrides: dict[str, Any] | None = None) -> Any:
    import warnings

    from transformer_lens.model_bridge import TransformerBridge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_transformers(
            model.files,
            load_weights=False,
            trust_remote_code=model.spec.trust_remote_code,
            tokenizer=model.tokenizer,
            hf_config_overrides=overrides,
        )


def _probe(bridge: Any, device: str) -> HookCatalog:
    """Run ``bridge`` on dummy tokens of two lengths with every hook attached, and record what each gives."""
    import warnings

    import torch

    points = dict(bridge.hook_dict)  # names and aliases -> hook points (an alias shares its point)
    seen: list[dict[int, tuple[int, ...]]] = []
    for b, t in _PROBES:
        got: dict[int, tuple[int, ...]] = {}

        def record(act: Any, hook: Any, into: dict = got) -> None:
            if isinstance(act, torch.Tensor):
                into.setdefault(id(hook), tuple(act.shape))

        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # hooks TransformerLens only enables on request are skipped, with a warning
            bridge.run_with_hooks(
                torch.zeros((b, t), dtype=torch.long, device=device),
                return_type=None,
                fwd_hooks=[(lambda _name: True, record)],
            )
        seen.append(got)
    per_token, other = {}, {}
    for n, point in sorted(points.items()):
        shapes: list[Any] = [got.get(id(point)) for got in seen]  # None where the hook did not fire
        if any(s is None for s in shapes):
            other[n] = "does not fire in a plain forward pass"
        elif all(s[:2] == probe for s, probe in zip(shapes, _PROBES, strict=True)) and shapes[0][2:] == shapes[1][2:]:
            per_token[n] = shapes[0][2:]
        else:
            other[n] = (
                f"gives shape {list(shapes[0])} for [batch={_PROBES[0][0]}, pos={_PROBES[0][1]}], "
                "not one vector per token [batch, pos, ...]"
            )
    return HookCatalog(tuple(sorted(points)), per_token, other)


def check_hook_layer(hook: str, model: ResolvedModel, names: Collection[str] = ()) -> None:
    """A hook's block must exist; the message lists the closest valid names (at the last block)."""
    layer, n = hook_layer(hook), model.n_layers
    if layer is not None and n is not None and layer >= n:
        moved = f"blocks.{n - 1}." + hook.split(".", 2)[2] if hook.count(".") >= 2 else hook
        close = _close(moved, names) if names else [moved]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ActcacheError(
            f"layer {layer} in hook {hook!r} is out of range: {model.spec.name!r} has {n} layers (0..{n - 1}){hint}",
            field="hook",
        )


def check_hook(hook: str, model: ResolvedModel, catalog: HookCatalog) -> tuple[int, ...]:
    """The per-token shape of ``hook``, or a one-line error naming the closest valid hooks."""
    check_hook_layer(hook, model, catalog.per_token)
    if hook in catalog.per_token:
        return catalog.per_token[hook]
    if hook in catalog.other:
        raise ActcacheError(
            f"hook {hook!r} {catalog.other[hook]}; pick a per-token hook such as hook_resid_post", field="hook"
        )
    check_hook_name(hook, list(catalog.per_token))
    raise AssertionError("unreachable")


def _close(hook: str, names: Collection[str]) -> list[str]:
    return difflib.get_close_matches(hook, names, n=5, cutoff=0.6) or difflib.get_close_matches(
        hook, names, n=3, cutoff=0.3
    )


def check_hook_name(hook: str, names: list[str]) -> None:
    if hook in names:
        return
    close = _close(hook, names)
    hint = f"did you mean {', '.join(close)}?" if close else "run `actcache hooks MODEL` to list them"
    raise ActcacheError(f"unknown hook {hook!r}; {hint}", field="hook")


# -- loading -----------------------------------------------------------------------------------
_LOADED: dict[tuple, Any] = {}
_LOAD_LOCK = threading.Lock()


def load_bridge(model: ResolvedModel, *, dtype: str = "float32", device: str = "cpu") -> Any:
    """The TransformerBridge for ``model`` with its weights, loaded once per process and reused across shards."""
    import torch

    key = (model.pin, dtype, device)
    with _LOAD_LOCK:
        if key not in _LOADED:
            from transformer_lens.model_bridge import TransformerBridge

            folder = model.weights()  # fetched once (a hub commit), its own one-line error
            try:
                bridge = TransformerBridge.boot_transformers(
                    folder,
                    device=device,
                    dtype=getattr(torch, dtype),
                    trust_remote_code=model.spec.trust_remote_code,
                    tokenizer=model.tokenizer,
                )
            except ActcacheError:
                raise
            except Exception as e:
                raise ActcacheError(
                    f"cannot load model {model.spec.name!r} with TransformerLens ({_first_line(e)})"
                ) from e
            model.check_unchanged()
            bridge.eval()
            _LOADED[key] = bridge
        return _LOADED[key]


def hook_names(model: ResolvedModel) -> list[str]:
    """Every hook name the bridge exposes (TransformerLens names and bridge aliases), without loading weights."""
    return list(hook_catalog(model).names)
