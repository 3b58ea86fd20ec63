"""Model resolution: names, hub revisions, fingerprints, config and tokenizer (hooks: ``inputs.hooks``; the
loaded bridge: ``inputs.bridge``).

Resolution reads only small files (config, tokenizer, weight hashes memoised by path/size/mtime), so a
complete set is recognised without loading any weights.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from actcache.errors import ActcacheError, opt
from actcache.inputs import fingerprint, hub

# Re-exported: the hook catalogue and the bridge's loading were defined here before they had modules of their own.
from actcache.inputs.bridge import load_bridge
from actcache.inputs.hooks import (
    HookCatalog,
    check_hook,
    check_hook_layer,
    check_hook_name,
    hook_catalog,
    hook_layer,
)

__all__ = [
    "BUILTIN_PREFIX",
    "PROBE_TEXT",
    "HookCatalog",
    "ModelSpec",
    "ResolvedModel",
    "check_hook",
    "check_hook_layer",
    "check_hook_name",
    "check_tokenizer",
    "hook_catalog",
    "hook_layer",
    "load_bridge",
    "resolve_model",
]


BUILTIN_PREFIX = "builtin:"
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "config.json")
_SMALL_FILES = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py", "*.vocab")
"""A hub commit's files that config, tokenizer and remote code read (no weights)."""
_HUB_WEIGHTS = ("*.safetensors", "*.bin")
"""The weight formats fetched from a hub commit, in order of preference (only the first the commit has)."""
_FACTS_VERSION = 4  # bump when ResolvedModel._read_facts changes what it returns


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
            "embedding_rows": self._cfg("vocab_size", "n_vocab", "padded_vocab_size"),
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
    def embedding_rows(self) -> int | None:
        """Token ids the model embeds (its config's vocab_size): a tokenizer given tokens the model was not resized
        for has more."""
        return self.facts["embedding_rows"]

    def check_embedded(self, i: int | None, what: str) -> None:
        """Refuse token id ``i`` where the model has no embedding for it (a tokenizer given tokens after the model
        was saved, the model not resized), before anything is written: the forward pass would fail deep in torch.
        ``what`` names the id in the message ("the tokenizer's pad token", ...)."""
        rows = self.embedding_rows
        if i is None or rows is None or i < rows:
            return
        try:
            token = repr(self.tokenizer.convert_ids_to_tokens(i))
        except Exception:  # only for the message
            token = "?"
        raise ActcacheError(
            f"{what} is id {i} ({token}), but {self.spec.name!r} embeds only ids 0..{rows - 1} (vocab_size in its "
            f"config.json; its tokenizer has {self.facts['vocab_size']} tokens): resize the model's embeddings to "
            "the tokenizer (model.resize_token_embeddings(len(tokenizer)), then save_pretrained) or use the "
            "tokenizer it was trained with"
        )

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

    def config_witness(self) -> dict[str, Any] | None:
        """For a local folder: its config.json and the hashes its fingerprint combines, which let a reader check the
        config against the set key and bound a shard by the hook's width (``format.width``); None for a hub model
        (its commit sha names the config in the Hugging Face cache), or when they no longer give the fingerprint."""
        if self.revision is not None or not os.path.isdir(self.source):
            return None
        from actcache.format.width import witness

        def read() -> dict[str, Any] | None:
            files = _local_files(self.source)
            out = witness(self.source, files)
            return out if out and "local:" + fingerprint.combine(files)[:40] == self.fingerprint else None

        return _loaded(self, "witness", read)

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


def _local_files(path: str) -> dict[str, str]:
    """The sha256 of each file a local model's fingerprint covers (weights and config.json), by name."""
    files = sorted({f for g in _WEIGHT_GLOBS for f in glob.glob(os.path.join(path, g))})
    return {os.path.basename(f): fingerprint.file_sha256(f) for f in files}


def _local_fingerprint(path: str) -> str:
    return "local:" + fingerprint.combine(_local_files(path))[:40]


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
