"""``extract --like SET``: the settings of an existing set, to reproduce it elsewhere or extend it.

A manifest records everything that changes a set's bytes. ``settings`` turns it back into ``ExtractConfig``
fields: the model and the dataset at the revisions they were resolved to (commit shas for hub ids, so a
moved branch cannot change what is reproduced), the hook, tokenization, dtypes, codec, shard size, and the
set's target size as ``max_tokens``. What never changes bytes (store, batch size, device, streaming) is not
recorded and keeps its default or its flag.

Without overrides of settings that change bytes, the reproduction must be the same set: ``check`` compares
the planned key with the manifest's before anything is written, and says which part differs (a local model
folder or data file that changed since, a different tokenizer...).
"""

from __future__ import annotations

from typing import Any

from actcache.errors import ActcacheError
from actcache.format import manifest
from actcache.format.key import SetKey

# Fields that do not change the bytes, and so neither come from the manifest nor make a reproduction differ
# (shard_bytes only sizes shards when shard_tokens is 0, and --like sets shard_tokens from the manifest).
NOT_RECORDED = frozenset(
    {
        "store",
        "storage_options",
        "aws_credentials_block",
        "batch_size",
        "device",
        "streaming",
        "verify_existing",
        "shard_bytes",
    }
)


def read_manifest(url: str, storage_options: dict[str, Any], credentials_block: str | None) -> dict[str, Any]:
    """The manifest of the set at ``url`` (the options of --store apply where the set is on the same kind of store)."""
    from actcache.storage.store import StoreRef

    s3 = url.startswith(("s3://", "s3a://"))
    store, set_id = StoreRef(url, storage_options, credentials_block if s3 else None).split()
    return manifest.read(store.open(), set_id)


def config_like(url: str, fields: dict[str, Any], given: frozenset[str]) -> tuple[Any, Any]:
    """``(config, check)`` for ``extract --like url``: every ``ExtractConfig`` field from the set's manifest, except
    those named in ``given``, which ``fields`` holds (with the defaults of the rest); ``check`` for the plan (see
    ``check``). The CLI and ``actcache.extract(like=...)`` both come here."""
    from actcache.config import ExtractConfig

    original = read_manifest(url, fields["storage_options"], fields["aws_credentials_block"])
    return ExtractConfig(**merge(original, fields, given)), check(original, given)


def settings(m: dict[str, Any]) -> dict[str, Any]:
    """``ExtractConfig`` fields that reproduce the set described by manifest ``m``."""
    if m.get("layout") == "rows":
        raise ActcacheError(
            f"set {m.get('set_id')} is a shuffled copy; reproduce its source "
            f"({m['key'].get('source')}) with --like, then `actcache shuffle` it with the same --seed"
        )
    try:
        model, data, tokens = m["model"], m["dataset"], m["key"]["tokens"]
        out = {
            "model": model["name"],
            "revision": model.get("revision"),
            "trust_remote_code": bool(model.get("trust_remote_code")),
            "hook": m["hook"],
            "dataset": data["path"],
            "text_column": data["text_column"],
            "token_column": tokens.get("token_column", ""),
            "context_size": tokens["context_size"],
            "prepend_bos": tokens["prepend_bos"],
            "separator": m["tokenization"]["separator"],
            "shard_tokens": m["shard_tokens"],
            "max_tokens": m["target_tokens"],
            "dtype": m["dtype"],
            "model_dtype": m["model_dtype"],
            "codec": m["codec"],
        }
        if m["codec"] != "none":
            out["codec_level"] = m["codec_level"]
        # What an example set or a selection adds to the key (each absent at its default, as in the key).
        key = m["key"]
        out.update(
            packing=tokens.get("packing", "concat"),
            truncate=tokens.get("truncate", "right"),
            positions=key.get("positions", "all"),
            keep_columns=key.get("keep_columns", ""),
            heads=key.get("heads", ""),
            dims=key.get("dims", ""),
        )
        if "examples" in m:  # target_tokens counts stored rows there; the plan counts examples of a context each
            out["max_tokens"] = m["examples"]["n_examples"] * tokens["context_size"]
        if "files" not in data:  # a hub dataset, by name, at the commit it was resolved to
            out.update(
                dataset_config=data.get("config"),
                split=data.get("split") or "train",
                dataset_revision=data.get("revision"),
            )
    except (KeyError, TypeError) as e:
        raise ActcacheError(
            f"set {m.get('set_id')} has a manifest without {e}; it cannot be reproduced with --like "
            "(written by an older actcache?)"
        ) from None
    return out


def merge(m: dict[str, Any], flags: dict[str, Any], given: frozenset[str]) -> dict[str, Any]:
    """Every ``ExtractConfig`` field: the flags given on the command line, else the manifest's, else the flags'
    defaults."""
    return {**flags, **settings(m), **{k: flags[k] for k in given}}


def check(m: dict[str, Any], given: frozenset[str]):
    """A check for the plan (``api.extract_sets``): the set it plans is the one ``m`` describes, unless settings
    that change the bytes were overridden (then a new set is the point)."""
    changed = given - NOT_RECORDED - {"max_tokens"}
    if changed:
        return None
    want = SetKey.from_dict(m["key"])

    def _check(plan) -> None:
        got = plan.sets[0].key
        if got.id == want.id:
            return
        raise ActcacheError(
            f"--like {want.id}: this would not reproduce it ({_difference(want, got)}); pass the "
            "original model/dataset, or override a setting on purpose"
        )

    return _check


def _difference(want: SetKey, got: SetKey) -> str:
    names = {
        "model": "the model's weights/config fingerprint",
        "tokens.dataset": "the dataset's fingerprint",
        "tokens.tokenizer": "the tokenizer",
        "forward": "the forward engine",
    }
    a, b = want.to_dict(), got.to_dict()
    for path, label in names.items():
        x, y = a, b
        for part in path.split("."):
            x, y = x[part], y[part]
        if x != y:
            return f"{label} differs: {x} then, {y} now"
    diffs = [k for k in a if a[k] != b[k]]
    return f"{', '.join(diffs)} differ"
