"""``actcache extract`` (flags generated from ExtractConfig, ``--like``) and ``actcache hooks``."""

from __future__ import annotations

import dataclasses
import sys
from typing import Annotated, Any

from cyclopts import Parameter

from actcache.cli.output import _human, _print_json, _warn_non_finite
from actcache.cli.parser import Json, StoreFlags, _Flags, app
from actcache.config import ExtractConfig


# -- extract -----------------------------------------------------------------------------------------
@app.command
def extract(
    *,
    config: Annotated[_Flags, Parameter(name="*")] = _Flags(),
    like: str | None = None,
    json_output: Json = False,
    verbose: Annotated[bool, Parameter(negative=())] = False,
    flags_given: Annotated[frozenset[str], Parameter(parse=False)] = frozenset(),
) -> int:
    """Extract hook activations over a dataset; print each set's URL (reruns compute only what is missing).

    Without PREFECT_API_URL, a request whose sets are all complete is answered from the store alone; work to do
    runs as a Prefect flow on a temporary local server.

    Parameters
    ----------
    like
        A set URL (`<store>/<set_id>`) whose manifest gives every setting that changes the bytes (model and dataset
        at their recorded revisions, hook, tokenization, dtypes, codec, shard size) and --max-tokens; the flags
        given on this command line override them. Reproduces or extends a set in --store; without overrides, the
        result is checked to be the same set.
    verbose
        Also show Prefect's log lines on the console (each task run's state; they are always in Prefect's records).
        Taken anywhere on the line, as --debug (`main` reads it before parsing).
    """
    from actcache.extras import require_extract

    require_extract("actcache extract")
    from actcache import api
    from actcache.sets import reproduce as like_mod

    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(ExtractConfig)}
    cfg, check = like_mod.config_like(like, fields, flags_given) if like else (ExtractConfig(**fields), None)
    result = api.extract_sets(cfg, check=check)
    if not json_output:
        _summary(cfg, result)
    for s in result:  # after the summary: a warning about the data is the last thing said
        _warn_non_finite(StoreFlags(cfg.storage_options, cfg.aws_credentials_block).open_set(s.url))
    if json_output:
        _print_json({"sets": [s.to_json() for s in result]})
    else:
        print("\n".join(s.url for s in result))
    return 0


def _summary(cfg: ExtractConfig, result: list[Any]) -> None:
    """What happened, where it is, what to try next: on stderr, before the URLs (stdout, for scripts)."""
    from actcache.orchestration import tempserver

    say = lambda line="": print(line, file=sys.stderr)  # noqa: E731
    first = result[0]
    say(f"model {cfg.model}, dataset {cfg.dataset}")
    for s in result:
        rate = (
            f", {s.tokens_computed / s.seconds:.0f} tokens/s over {s.seconds:.1f} s"
            if s.tokens_computed and s.seconds
            else ""
        )
        state = "complete" if s.complete else "incomplete"
        if s.reused:
            say(
                f"{s.hook}: the same token ids are already stored (read from text or from a token column): "
                f"reused set {s.set_id} instead of computing {s.requested_id}; {s.n_tokens} tokens, "
                f"{_human(s.bytes)} ({state})"
            )
            say(f"  set  {s.url}")
            continue
        say(
            f"{s.hook}: {s.shards_computed} shards computed, {s.shards_skipped} already stored; "
            f"{s.n_tokens} tokens in {s.n_shards} shards, {_human(s.bytes)}{rate} ({state})"
        )
        say(f"  set  {s.url}")
    if first.run_url:
        say(f"  run  {first.run_url}")
    elif first.seconds and not tempserver.api_configured():
        say(
            "  runs are not kept (a temporary Prefect server ran them): to keep them, with a UI, run "
            "`prefect server start` and export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    say("next:")
    say(f"  actcache show {first.url}")
    say(f"  python -c \"import actcache; s = actcache.open_set('{first.url}'); print(s.n_tokens, s.manifest['d'])\"")


@app.command
def hooks(
    model: str, /, *, revision: str | None = None, trust_remote_code: bool = False, json_output: Json = False
) -> int:
    """List the hook names a model offers, each with its per-token shape (what `extract --hook` takes) or why it
    cannot be extracted.

    Parameters
    ----------
    model
        HF model id, a local directory written by save_pretrained, or builtin:tiny-gpt2.
    revision
        Model revision (branch, tag or commit) on the HF hub.
    trust_remote_code
        Allow model code from the hub to run.
    """
    from actcache import console
    from actcache.extras import require_extract

    require_extract("actcache hooks")
    from actcache.inputs.hooks import hook_catalog
    from actcache.inputs.model import ModelSpec, resolve_model

    with console.status(f"loading {model} to list its hooks"):
        catalog = hook_catalog(resolve_model(ModelSpec(model, revision, trust_remote_code)))
    if json_output:
        shapes, why = catalog.per_token, catalog.other
        _print_json(
            {
                "model": model,
                "hooks": [{"name": n, "shape": list(shapes[n])} for n in catalog.names if n in shapes],
                "not_per_token": [{"name": n, "why": why[n]} for n in catalog.names if n in why],
            }
        )
        return 0
    width = max(map(len, catalog.names), default=0)
    for name in catalog.names:  # sorted, aliases beside the names they share a hook point with
        shape = catalog.per_token.get(name)
        print(f"{name:{width}}  {list(shape) if shape is not None else '(' + catalog.other[name] + ')'}")
    return 0
