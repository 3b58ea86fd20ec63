"""How wide a set's activations can be, from what its key vouches for: memory is bounded by the key, not the manifest.

A set id is the digest of its key, and the key names the model by a fingerprint: ``local:<hash>`` of a folder's
weight files and config.json, or ``hf:<commit sha>``. The manifest of a set made from a local folder carries that
config.json and the sha256 of every fingerprinted file (``model_config``); a reader recomputes the fingerprint from
them and accepts the config only if it is the key's. A hub model's config is taken from the local Hugging Face cache,
where the commit sha names the folder it was downloaded into. From a checked config and the hook's name, a small
rule gives the hook's per-token shape (``hook_shape``), narrowed by the key's ``--heads``/``--dims``; a manifest whose
``d`` exceeds it is damage, whatever it is sealed with. Pure Python: reading works on the light install.

Where no config checks out (sets written before manifests carried one, a hub model not in the cache, a hook the
rule does not know), ``key_width`` is None and readers keep the stored-size bound (``shard.inflation_cap``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from typing import Any

from actcache.inputs.fingerprint import combine

_SHA_RE = re.compile(r"^[0-9a-f]{40}\Z")
_D_MODEL = re.compile(
    r"^(hook_embed|hook_pos_embed|ln_final\.hook_normalized"
    r"|blocks\.\d+\.(hook_resid_pre|hook_resid_mid|hook_resid_post|hook_attn_out|hook_mlp_out|ln[12]\.hook_normalized))\Z"
)
_SCALE = re.compile(r"^(ln_final|blocks\.\d+\.ln[12])\.hook_scale\Z")
_MLP = re.compile(r"^blocks\.\d+\.mlp\.hook_(pre|post|pre_linear)\Z")
_HEADS = re.compile(r"^blocks\.\d+\.attn\.hook_(z|q|k|v)\Z")
_RESULT = re.compile(r"^blocks\.\d+\.attn\.hook_result\Z")


def witness(folder: str, files: dict[str, str]) -> dict[str, Any] | None:
    """What a manifest carries so that readers can check a local model's config against its fingerprint: the sha256
    of each fingerprinted file (``files``, as ``inputs.model`` hashes them) and config.json's text."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8", newline="") as f:  # its bytes, as hashed
            text = f.read(1 << 20)
    except (OSError, UnicodeDecodeError):
        return None
    return {"files": dict(files), "config": text}


def _int(cfg: dict, *names: str) -> int | None:
    for n in names:
        v = cfg.get(n)
        if type(v) is int and v > 0:
            return v
    return None


def hook_shape(config: dict[str, Any], hook: str) -> tuple[int, ...] | None:
    """An upper bound of ``hook``'s per-token shape in a model of ``config`` (a config.json), for the hooks whose
    shape follows from the config in every architecture (the residual stream, attention and MLP outputs, norms,
    MLP neurons, per-head q/k/v/z/result); None for any other hook. Exact but for keys and values of grouped-query
    attention (fewer heads than the bound says) and the MLP's input hooks (a fused gate and up: twice its width)."""
    text = config.get("text_config")
    cfg: dict[str, Any] = text if isinstance(text, dict) else config
    d_model = _int(cfg, "hidden_size", "n_embd", "n_embed", "d_model")
    n_heads = _int(cfg, "num_attention_heads", "n_head", "num_heads", "n_heads")
    if _SCALE.match(hook):
        return (1,)
    if d_model is None:
        return None
    if _D_MODEL.match(hook):
        return (d_model,)
    if _MLP.match(hook):
        widths = [cfg.get(n) for n in ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "d_mlp")]
        if "n_inner" in cfg and cfg["n_inner"] is None:  # GPT-2's convention: None is 4 * d_model
            widths.append(4 * d_model)
        known = [w for w in widths if type(w) is int and w > 0]
        if not known:
            return None
        # hook_post is the neurons, as wide as the MLP; before the activation, an architecture that fuses its
        # gate and up projections may hook both at once: twice that, so that no true set is ever refused.
        return (max(known) * (1 if hook.endswith("hook_post") else 2),)
    if n_heads is None:
        return None
    if _RESULT.match(hook):
        return (n_heads, d_model)
    if _HEADS.match(hook):
        return (n_heads, _int(cfg, "head_dim", "d_head", "kv_channels") or d_model // n_heads)
    return None


def _selected(shape: tuple[int, ...] | None, key: Any) -> int | None:
    """Values per token of ``shape`` once the key's --heads and --dims are applied (both counts are in the key)."""
    heads = len(key.heads.split(",")) if key.heads else None
    dims = len(key.dims.split(",")) if key.dims else None
    if shape is None:  # without the config, only a selection of both axes (or of a vector's only one) is known
        is_heads = bool(_HEADS.match(key.hook) or _RESULT.match(key.hook))
        if heads is not None and dims is not None:
            return heads * dims
        if dims is not None and not is_heads and (_D_MODEL.match(key.hook) or _MLP.match(key.hook)):
            return dims
        return None
    out = list(shape)
    if heads is not None:
        out[0] = heads
    if dims is not None:
        out[-1] = dims
    n = 1
    for x in out:
        n *= x
    return n


def _local_config(fp: str, m: dict[str, Any]) -> dict[str, Any] | None:
    w = m.get("model_config")
    if not isinstance(w, dict):
        return None
    files, text = w.get("files"), w.get("config")
    if not (isinstance(files, dict) and isinstance(text, str) and all(isinstance(v, str) for v in files.values())):
        return None
    if files.get("config.json") != hashlib.sha256(text.encode("utf-8")).hexdigest():
        return None
    if "local:" + combine(files)[:40] != fp:
        return None
    return _parse(text)


def _hub_cache() -> str:
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return cache
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return os.path.join(home, "hub")


def _hub_config(sha: str) -> dict[str, Any] | None:
    """The config.json of hub commit ``sha`` as the local Hugging Face cache holds it (any repository: the sha names
    the commit), or None."""
    if not _SHA_RE.match(sha):
        return None
    pattern = os.path.join(glob.escape(_hub_cache()), "models--*", "snapshots", sha, "config.json")
    for path in sorted(glob.glob(pattern)):
        try:
            with open(path, encoding="utf-8") as f:
                config = _parse(f.read(1 << 20))
        except (OSError, UnicodeDecodeError):
            continue
        if config is not None:
            return config
    return None


def _parse(text: str) -> dict[str, Any] | None:
    try:
        config = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return config if isinstance(config, dict) else None


def model_config(key: Any, m: dict[str, Any]) -> dict[str, Any] | None:
    """The config.json of the key's model, where something checked against the key's fingerprint gives it."""
    fp = getattr(key, "model", None)
    if not isinstance(fp, str):
        return None
    if fp.startswith("local:"):
        return _local_config(fp, m)
    if fp.startswith("hf:"):
        return _hub_config(fp[3:])
    return None


def key_width(key: Any, m: dict[str, Any]) -> int | None:
    """The most values per token a true shard of this set's key holds (``key`` a SetKey, ``m`` its manifest), or None
    when nothing the key vouches for says (then readers bound a shard by its stored size)."""
    if not hasattr(key, "hook"):
        return None  # a shuffled copy: its key names its source, not a model (its shards are stored uncompressed)
    config = model_config(key, m)
    return _selected(hook_shape(config, key.hook) if config is not None else None, key)
