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
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from actcache import fingerprint
from actcache.errors import ActcacheError

BUILTIN_PREFIX = "builtin:"
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "config.json")
_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")
_FACTS_VERSION = 1  # bump when ResolvedModel._read_facts changes what it returns


@dataclass(frozen=True)
class ModelSpec:
    name: str
    """HF hub id, local directory written by ``save_pretrained``, or ``builtin:tiny-gpt2``."""
    revision: str | None = None
    trust_remote_code: bool = False


class ResolvedModel:
    """A model located and fingerprinted, weights not yet loaded."""

    def __init__(self, spec: ModelSpec, source: str, fingerprint: str, revision: str | None, files: str = ""):
        self.spec, self.source, self.fingerprint, self.revision = spec, source, fingerprint, revision
        self.files = files
        """Content hash of every file config and tokenizer load from (local folders; a hub commit fixes them)."""

    @cached_property
    def facts(self) -> dict[str, Any]:
        """What a plan needs of the config and tokenizer: layers, context limit, architecture, tokenizer fingerprint
        and special ids. Kept on disk under a hash of what they are read from (files or commit, versions of
        transformers and tokenizers), so a rerun plans without importing transformers (~3 s) or loading either."""
        from importlib.metadata import version

        key = fingerprint.combine({"facts": _FACTS_VERSION, "model": self.fingerprint, "files": self.files,
                                   "trust_remote_code": self.spec.trust_remote_code,
                                   "transformers": version("transformers"), "tokenizers": version("tokenizers")})
        return fingerprint.remembered("model-facts", key, self._read_facts)

    def _read_facts(self) -> dict[str, Any]:
        facts = {"n_layers": self._cfg("num_hidden_layers", "n_layer", "num_layers"),  # the config first: its
                 "max_context": self._cfg("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"),
                 "model_type": getattr(self.config, "model_type", None)}  # errors say more than the tokenizer's
        tok = self.tokenizer
        return {**facts, "tokenizer_fingerprint": _tokenizer_fingerprint(tok),
                "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}

    @cached_property
    def config(self) -> Any:
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.source, revision=self.revision,
                                              trust_remote_code=self.spec.trust_remote_code)
        except Exception as e:  # a broken or foreign config.json, an unknown model_type, ...
            raise ActcacheError(f"model {self.spec.name!r} has no usable config.json ({_first_line(e)}); "
                                "write the folder with save_pretrained or pass an HF model id") from e

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
    def max_context(self) -> int | None:
        return self.facts["max_context"]

    @property
    def model_type(self) -> str | None:
        return self.facts["model_type"]

    @cached_property
    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(self.source, revision=self.revision,
                                                trust_remote_code=self.spec.trust_remote_code)
        except Exception as e:
            raise ActcacheError(f"model {self.spec.name!r} has no loadable tokenizer ({_first_line(e)})") from e
        check_tokenizer(tok, self.spec.name)
        return tok

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.facts["tokenizer_fingerprint"]

    def describe(self) -> dict[str, Any]:
        return {"name": self.spec.name, "revision": self.revision, "fingerprint": self.fingerprint,
                "trust_remote_code": self.spec.trust_remote_code}


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
        raise ActcacheError(f"the tokenizer of {name!r} cannot tokenize: {why}; is the folder missing its tokenizer "
                            "files (tokenizer.json, vocab/merges)? save them with tokenizer.save_pretrained")


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:200]


def resolve_model(spec: ModelSpec) -> ResolvedModel:
    name = spec.name
    if name.startswith(BUILTIN_PREFIX):
        from actcache import demo

        name = str(demo.builtin_model(name[len(BUILTIN_PREFIX):]))
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        files = sorted({f for g in _WEIGHT_GLOBS for f in glob.glob(os.path.join(path, g))})
        if not any(not f.endswith("config.json") for f in files):
            raise ActcacheError(f"model directory {name!r} has no weight files (*.safetensors, *.bin); "
                                "write it with save_pretrained or pass an HF model id")
        parts = {os.path.basename(f): fingerprint.file_sha256(f) for f in files}
        others = sorted(f for f in glob.glob(os.path.join(path, "*")) if os.path.isfile(f) and f not in files)
        around = {os.path.basename(f): fingerprint.file_sha256(f) for f in [*others, os.path.join(path, "config.json")]
                  if os.path.exists(f)}  # tokenizer files, config, code: what facts are read from besides weights
        return ResolvedModel(spec, path, "local:" + fingerprint.combine(parts)[:40], None,
                             files=fingerprint.combine(around))
    if path.startswith(("/", ".", "~")) or os.path.exists(path):
        raise ActcacheError(f"model {name!r} not found: no such directory; pass an HF model id or a "
                            "directory written by save_pretrained")
    sha = _hub_sha(name, spec.revision)
    return ResolvedModel(spec, name, "hf:" + sha, sha)


def _hub_sha(name: str, revision: str | None) -> str:
    """Commit sha of a hub model: asked of the hub, else read from the local HF cache."""
    err: BaseException | None = None
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(name, revision=revision).sha
    except Exception as e:
        err = e
    try:
        from huggingface_hub import snapshot_download

        snap = snapshot_download(name, revision=revision, local_files_only=True,
                                 allow_patterns=["config.json"])
        return os.path.basename(os.path.normpath(snap))
    except Exception:
        pass
    raise ActcacheError(f"model {name!r} not found: not a local directory, not in the HF cache, and the hub "
                        f"did not answer ({_first_line(err)}); check --model/--revision or network access")


# -- hooks -------------------------------------------------------------------------------------
def hook_layer(hook: str) -> int | None:
    """Block index a hook belongs to (None for embedding / final-norm hooks)."""
    m = _LAYER_RE.match(hook)
    return int(m.group(1)) if m else None


def check_hook_layer(hook: str, model: ResolvedModel) -> None:
    layer, n = hook_layer(hook), model.n_layers
    if layer is not None and n is not None and layer >= n:
        raise ActcacheError(f"layer {layer} in hook {hook!r} is out of range: {model.spec.name!r} has "
                            f"{n} layers (0..{n - 1})")


def check_hook_name(hook: str, names: list[str]) -> None:
    if hook in names:
        return
    close = difflib.get_close_matches(hook, names, n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "run `actcache hooks MODEL` to list them"
    raise ActcacheError(f"unknown hook {hook!r}; {hint}")


# -- loading -----------------------------------------------------------------------------------
_LOADED: dict[tuple, Any] = {}
_LOAD_LOCK = threading.Lock()


def load_bridge(model: ResolvedModel, *, dtype: str = "float32", device: str = "cpu",
                load_weights: bool = True) -> Any:
    """The TransformerBridge for ``model``, loaded once per process and reused across shards."""
    import torch

    key = (model.source, model.revision, dtype, device, load_weights)
    with _LOAD_LOCK:
        if key not in _LOADED:
            from transformer_lens.model_bridge import TransformerBridge

            try:
                bridge = TransformerBridge.boot_transformers(
                    model.source, device=device, dtype=getattr(torch, dtype), revision=model.revision,
                    trust_remote_code=model.spec.trust_remote_code, tokenizer=model.tokenizer,
                    load_weights=load_weights)
            except ActcacheError:
                raise
            except Exception as e:
                raise ActcacheError(f"cannot load model {model.spec.name!r} with TransformerLens "
                                    f"({_first_line(e)})") from e
            bridge.eval()
            _LOADED[key] = bridge
        return _LOADED[key]


def hook_names(model: ResolvedModel) -> list[str]:
    """Every hook name the bridge exposes (TransformerLens names and bridge aliases)."""
    return sorted(load_bridge(model, load_weights=False).hook_dict)
