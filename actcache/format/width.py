"""How wide a set's activations can be, from what its key vouches for: memory is bounded by the key, not the manifest.

A set id is the digest of its key, and the key names the model by a fingerprint: ``local:<hash>`` of a folder's
weight files and config.json, or ``hf:<commit sha>``. The manifest of a set made from a local folder carries that
config.json and the sha256 of every fingerprinted file (``model_config``); a reader recomputes the fingerprint from
them and accepts the config only if it is the key's. A hub model's config is taken from the local Hugging Face cache
(the commit sha names the folder it was downloaded into), else fetched from the hub by that commit and checked: the
hub must serve it as the key's commit's file, and its bytes must hash to the git blob the hub names. From a checked
config and the hook's name, one table of TransformerLens's hook families (``FAMILIES``) gives the hook's per-token
shape, narrowed by the key's ``--heads``/``--dims``; a manifest whose ``d`` exceeds it is damage, whatever it is
sealed with. The plan checks every hook it extracts against the same table, so no true set is refused. Pure Python:
reading works on the light install.

Where no config checks out (sets written before manifests carried one, a hub commit neither cached nor fetched, a
hook of no family), ``of`` says why and readers keep the stored-size bound (``shard.inflation_cap``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from actcache.inputs.fingerprint import cache_dir, combine, write_quietly

_SHA_RE = re.compile(r"^[0-9a-f]{40}\Z")
_BLOCK = r"blocks\.\d+\."
_NORM = r"(?:ln_final|" + _BLOCK + r"ln\w*)"
# Each hook family TransformerLens (HookedTransformer names, and the bridge's component aliases) gives, as the names
# of the sizes its per-token shape is made of: the one table readers bound a shard by, and that the plan checks
# every hook it extracts against (``extraction.plan.check_width_rule``).
FAMILIES: tuple[tuple[re.Pattern[str], tuple[str, ...]], ...] = tuple(
    (re.compile(f"^(?:{names})\\Z"), shape)
    for names, shape in (
        # the residual stream and what is added to it; norms' outputs; embeddings; every component's input side
        (
            rf"hook_embed|hook_pos_embed|embed\.hook_out|pos_embed\.hook_out|unembed\.hook_in|rotary_emb\.hook_in"
            rf"|{_BLOCK}(hook_resid_pre|hook_resid_mid|hook_resid_post|hook_attn_out|hook_mlp_out|hook_mlp_in"
            rf"|hook_in|hook_out)"
            rf"|{_NORM}\.(hook_normalized|hook_in|hook_out)"
            rf"|{_BLOCK}attn\.(hook_in|hook_out|hook_hidden_states|(q|k|v|qkv)\.hook_in|o\.hook_out)"
            rf"|{_BLOCK}mlp\.(hook_in|hook_out|(in|gate|up)\.hook_in|(out|down)\.hook_out)",
            ("d_model",),
        ),
        (rf"{_NORM}\.hook_scale", ("one",)),
        (r"hook_tokens|embed\.hook_in|pos_embed\.hook_in", ()),  # a token id, a position: one value
        (r"hook_unembed|unembed\.hook_out", ("d_vocab",)),
        (rf"{_BLOCK}attn\.(hook_q|hook_z|hook_rot_q|q\.hook_out|o\.hook_in)", ("n_heads", "d_head")),
        (rf"{_BLOCK}attn\.(hook_k|hook_v|hook_rot_k|(k|v)\.hook_out)", ("n_kv_heads", "d_head")),
        (rf"{_BLOCK}attn\.qkv\.hook_out", ("qkv",)),
        (
            rf"{_BLOCK}(attn\.)?(hook_attn_in|hook_q_input|hook_k_input|hook_v_input)|{_BLOCK}attn\.hook_result",
            ("n_heads", "d_model"),
        ),
        # per query position, one score per key position: as many as the key's context
        (rf"{_BLOCK}attn\.(hook_pattern|hook_attn_scores)", ("n_heads", "context")),
        (rf"({_BLOCK}attn|rotary_emb)\.(hook_cos|hook_sin)", ("d_head",)),
        (rf"{_BLOCK}mlp\.(hook_post|out\.hook_in|down\.hook_in)", ("d_mlp",)),
        # before the activation, an architecture that fuses its gate and up projections hooks both at once
        (rf"{_BLOCK}mlp\.(hook_pre|hook_pre_linear|(in|gate|up)\.hook_out)", ("d_mlp_in",)),
    )
)


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


def _sizes(config: dict[str, Any], context: int | None) -> dict[str, int | None]:
    """The sizes ``FAMILIES`` names, from a config.json (a multimodal model's text model's: ``text_config``)."""
    text = config.get("text_config")
    cfg: dict[str, Any] = text if isinstance(text, dict) else config
    d_model = _int(cfg, "hidden_size", "n_embd", "n_embed", "d_model")
    n_heads = _int(cfg, "num_attention_heads", "n_head", "num_heads", "n_heads")
    kv = _int(cfg, "num_key_value_heads")
    n_kv = kv if kv is not None and n_heads is not None and kv <= n_heads else n_heads  # else no fewer than q's
    d_head = _int(cfg, "head_dim", "d_head", "kv_channels") or (
        d_model // n_heads if d_model is not None and n_heads is not None and d_model >= n_heads else None
    )
    widths = [cfg.get(n) for n in ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "d_mlp")]
    if d_model is not None and "n_inner" in cfg and cfg["n_inner"] is None:  # GPT-2's convention: 4 * d_model
        widths.append(4 * d_model)
    known = [w for w in widths if type(w) is int and w > 0]
    d_mlp = max(known) if known else None
    qkv = (n_heads + 2 * n_kv) * d_head if n_heads is not None and n_kv is not None and d_head is not None else None
    return {
        "one": 1,
        "d_model": d_model,
        "n_heads": n_heads,
        "n_kv_heads": n_kv,
        "d_head": d_head,
        "qkv": qkv,
        "d_mlp": d_mlp,
        "d_mlp_in": 2 * d_mlp if d_mlp is not None else None,
        "d_vocab": _int(cfg, "vocab_size", "n_vocab", "padded_vocab_size"),
        "context": context if type(context) is int and context > 0 else None,
    }


def hook_shape(config: dict[str, Any], hook: str, context: int | None = None) -> tuple[int, ...] | None:
    """An upper bound of ``hook``'s per-token shape in a model of ``config`` (a config.json), by the family of
    TransformerLens hooks it belongs to (``FAMILIES``); None for a hook of no family, or when the config lacks a size
    its family needs. Exact but for keys and values where a config names no key-value head count (then as many as
    the queries'), the MLP's input hooks (a fused gate and up: twice its width) and attention patterns (one score per
    key position: ``context``, the set's)."""
    for pattern, names in FAMILIES:
        if pattern.match(hook):
            sizes = _sizes(config, context)
            shape = tuple(sizes[n] for n in names)
            return shape if all(v is not None for v in shape) else None  # type: ignore[return-value]
    return None


def _family(hook: str) -> tuple[str, ...] | None:
    for pattern, names in FAMILIES:
        if pattern.match(hook):
            return names
    return None


def _selected(shape: tuple[int, ...] | None, key: Any) -> int | None:
    """Values per token of ``shape`` once the key's --heads and --dims are applied (both counts are in the key: a
    count above the axis it selects from is no true key's, and bounds nothing beyond the axis)."""
    heads = len(key.heads.split(",")) if key.heads else None
    dims = len(key.dims.split(",")) if key.dims else None
    if shape is None:  # without the config, only a selection of both axes (or of a vector's only one) is known
        names = _family(key.hook)
        if names is not None and len(names) == 2 and heads is not None and dims is not None:
            return heads * dims
        if names is not None and len(names) == 1 and dims is not None:
            return dims
        return None
    out = list(shape)
    if heads is not None and len(out) == 2:
        out[0] = min(heads, out[0])
    if dims is not None and out:
        out[-1] = min(dims, out[-1])
    return math.prod(out)


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


CONFIG_LIMIT = 1 << 20
"""Largest config.json read (real ones are a few KB)."""
FETCH_TIMEOUT = 10.0
"""Seconds a request for a hub commit's config.json may wait for an answer (connect, and each read)."""
FETCH_RETRY_S = 60.0
"""Seconds a failed fetch is remembered: a process asks the hub again after it (a transient network failure must not
make every later reader of a long-running trainer keep the stored-size bound); a fetched config is kept for good."""
_FETCHED: dict[tuple[str, str], tuple[float, tuple[dict[str, Any] | None, str | None]]] = {}
"""(name, sha) -> (when it was fetched, by ``time.monotonic``; what the fetch gave)."""


def _fetched_path(sha: str) -> str:
    return os.path.join(str(cache_dir()), "hub-configs", f"{sha}.json")


def _cached_hub_config(sha: str) -> dict[str, Any] | None:
    """The config.json of hub commit ``sha`` as the local Hugging Face cache holds it (any repository: the sha names
    the commit), or as a reader fetched and checked it before (``_fetch``); else None."""
    paths = sorted(glob.glob(os.path.join(glob.escape(_hub_cache()), "models--*", "snapshots", sha, "config.json")))
    for path in [*paths, _fetched_path(sha)]:
        config = read_config(path)
        if config is not None:
            return config
    return None


def git_blob_id(data: bytes) -> str:
    """The git object id of a file of ``data`` (what the hub's ETag is for a file not stored with LFS)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def _fetch(name: str, sha: str) -> tuple[dict[str, Any] | None, str | None]:
    """The config.json of commit ``sha`` of hub model ``name``, fetched (a few KB) and checked: the hub must serve it as
    that commit's file, and its bytes must be the git blob the hub names; kept under actcache's cache for the next
    reader. Else (None, why not, and how to fetch it by hand)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session

    from actcache.inputs.hub import first_line

    how = f"`hf download {name} config.json --revision {sha}` fetches it"
    if constants.HF_HUB_OFFLINE:
        return None, f"the hub is offline (HF_HUB_OFFLINE) and its model's config.json is not cached; {how}"
    try:
        meta = get_hf_file_metadata(hf_hub_url(name, "config.json", revision=sha), timeout=FETCH_TIMEOUT)
        if meta.commit_hash != sha or not meta.etag or not meta.location:
            raise ValueError(f"the hub answered for commit {meta.commit_hash}, not the key's")
        if meta.size is not None and meta.size > CONFIG_LIMIT:
            raise ValueError(f"config.json has {meta.size} bytes")
        data = b""
        with get_session().stream("GET", meta.location, headers=build_hf_headers(), timeout=FETCH_TIMEOUT) as r:
            r.raise_for_status()
            for chunk in r.iter_bytes():
                data += chunk
                if len(data) > CONFIG_LIMIT:
                    raise ValueError(f"config.json has more than {CONFIG_LIMIT} bytes")
        if git_blob_id(data) != meta.etag:
            raise ValueError("its bytes are not the blob the hub names")
        config = _parse(data.decode("utf-8"))
        if config is None:
            raise ValueError("config.json is not a JSON object")
    except Exception as e:  # whatever the hub or the network did: no width from it, and why
        return None, f"its model's config.json is not cached and the hub did not give it ({first_line(e)}); {how}"
    write_quietly(_fetched_path(sha), data)  # the next reader of any set of this commit needs no request
    return config, None


def _hub_config(sha: str, name: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(config.json of hub commit ``sha``, None) from the cache or the hub (repository ``name``, as the manifest
    names it: a commit sha is found only in a repository that holds it), or (None, why not)."""
    if not _SHA_RE.match(sha):
        return None, "its key's model is not a hub commit"
    config = _cached_hub_config(sha)
    if config is not None:
        return config, None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except (HFValidationError, TypeError):
        return None, "its model's config.json is not cached and its manifest names no hub repository to fetch it from"
    at, got = _FETCHED.get((name, sha), (0.0, (None, None)))
    if (name, sha) not in _FETCHED or (got[0] is None and time.monotonic() - at >= FETCH_RETRY_S):
        at, got = time.monotonic(), _fetch(name, sha)
        _FETCHED[(name, sha)] = at, got
    return got


def read_config(path: str) -> dict[str, Any] | None:
    """The config.json at ``path`` as a dict (at most ``CONFIG_LIMIT`` bytes of it), or None."""
    try:
        with open(path, encoding="utf-8") as f:
            return _parse(f.read(CONFIG_LIMIT))
    except (OSError, UnicodeDecodeError):
        return None


def _parse(text: str) -> dict[str, Any] | None:
    try:
        config = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return config if isinstance(config, dict) else None


@dataclass(frozen=True)
class KeyWidth:
    """What a set's key vouches for about its width."""

    values: int | None
    """The most values per token a true shard of the key holds; None when nothing the key vouches for says."""
    why_not: str | None = None
    """Where ``values`` is None: why, and how to make the bound exact (one clause, for a line about the set)."""


def _config(key: Any, m: dict[str, Any], fetch: bool = True) -> tuple[dict[str, Any] | None, str | None]:
    """(config.json of the key's model, None) where something checked against the key's fingerprint gives it, else
    (None, why not). Without ``fetch`` only what is on this machine is looked at (no request to the hub)."""
    fp = getattr(key, "model", None)
    if isinstance(fp, str) and fp.startswith("local:"):
        if not isinstance(m.get("model_config"), dict):
            return None, "its manifest carries no model config (written before manifests did: re-extract it)"
        config = _local_config(fp, m)
        return (config, None) if config is not None else (None, "its manifest's model config is not its key's model's")
    if isinstance(fp, str) and fp.startswith("hf:"):
        if not fetch:
            config = _cached_hub_config(fp[3:]) if _SHA_RE.match(fp[3:]) else None
            return (config, None) if config is not None else (None, "its model's config.json is not cached")
        return _hub_config(fp[3:], (m.get("model") or {}).get("name") if isinstance(m.get("model"), dict) else None)
    return None, "its key names no model actcache can check"


def model_config(key: Any, m: dict[str, Any]) -> dict[str, Any] | None:
    """The config.json of the key's model, where something checked against the key's fingerprint gives it."""
    return _config(key, m)[0]


def of(key: Any, m: dict[str, Any], *, fetch: bool = True) -> KeyWidth:
    """What the key of the set whose manifest is ``m`` vouches for about its width. A shuffled copy's key names its
    source by id; its manifest carries the source's manifest (``source``: key, model and model config), whose key must
    have that id: then the source's bound is the copy's. ``fetch``: a hub model's config.json that is not cached may
    be fetched (by readers of shards; what only reads manifests, as ``ls`` and planning, never waits on the hub)."""
    if not hasattr(key, "hook"):
        from actcache.format.key import SetKey

        got = m.get("source")
        source: dict[str, Any] = got if isinstance(got, dict) else {}
        try:
            src_key = SetKey.from_dict(source["key"])
        except (TypeError, ValueError, KeyError):
            return KeyWidth(None, "its manifest carries no readable key of its source")
        if src_key.id != getattr(key, "source", None):
            return KeyWidth(None, "the source key its manifest carries is not its source's")
        key, m = src_key, source
    config, why = _config(key, m, fetch)
    if not isinstance(key.tokens.context_size, int):
        config = None
    shape = hook_shape(config, key.hook, key.tokens.context_size) if config is not None else None
    values = _selected(shape, key)
    if values is None and config is not None:
        why = f"actcache derives no width for hook {key.hook!r} from its model's config.json"
    return KeyWidth(values, None if values is not None else why)


def key_width(key: Any, m: dict[str, Any], *, fetch: bool = True) -> int | None:
    """The most values per token a true shard of this set's key holds (``key`` a SetKey or ShuffleKey, ``m`` its
    manifest), or None when nothing the key vouches for says (then readers bound a shard by its stored size)."""
    return of(key, m, fetch=fetch).values
