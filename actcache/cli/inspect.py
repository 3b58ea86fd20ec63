"""Commands that read a set or store and change nothing: ls, show, verify, diff, stats."""

from __future__ import annotations

import json
import sys

from actcache import console
from actcache.cli.output import _human, _print_json, _ranges, _table, _warn_mixed, _warn_non_finite
from actcache.cli.parser import Json, StoreFlags, app
from actcache.config import StorageOptions


# -- reading ------------------------------------------------------------------------------------------
@app.command
def ls(store: str, /, *, json_output: Json = False, flags: StoreFlags = StoreFlags()) -> int:
    """List the sets in a store: model, hook, layout (tokens in order, or shuffled rows), tokens, bytes and state
    (complete, incomplete, damaged).

    Parameters
    ----------
    store
        A local folder or any fsspec URL (s3://bucket/prefix).
    """
    from actcache.sets import inventory

    s = flags.store(store)
    s.check_reachable()
    sets = inventory.list_sets(s)
    parent, name = flags.ref(store).split()
    if not sets and inventory.is_set_id(name):  # a set's URL: show that set, and say where its store is
        entry = inventory.describe_set(parent.open(), name)
        if entry is not None:
            sets = [entry]
            print(
                f"{store} is a set, not a store; its store is {parent.url} (`actcache ls {parent.url}` lists "
                f"every set there, `actcache show {store}` describes this one)",
                file=sys.stderr,
            )
    if json_output:
        _print_json({"store": s.url, "sets": [e.to_json() for e in sets]})
        return 0
    if not sets:
        print(f"no sets in {s.url}", file=sys.stderr)
    rows = [("SET", "MODEL", "HOOK", "LAYOUT", "TOKENS", "BYTES", "NON-FINITE", "STATE")]
    for e in sets:
        tokens = "-" if e.n_tokens is None else str(e.n_tokens)
        nf = e.non_finite
        bad = "-" if nf is None else f"{nf['inf']} inf, {nf['nan']} nan" if nf["inf"] or nf["nan"] else "0"
        interrupted = e.state == inventory.INCOMPLETE and e.n_tokens is not None  # a manifest below its target
        state = f"{e.state}: {e.detail}" if e.state == "damaged" else inventory.INTERRUPTED if interrupted else e.state
        kind = (
            "?" if e.state in ("incomplete", "damaged") and e.model is None else _LAYOUTS.get(e.layout) or str(e.layout)
        )
        rows.append((e.set_id, e.model or "?", e.hook or "?", kind, tokens, _human(e.bytes), bad, state))
    _table(rows)
    for e in sets:
        if e.state == inventory.INCOMPLETE and e.n_tokens is not None:
            print(f"{e.set_id}: {e.detail}", file=sys.stderr)
    return 0


_LAYOUTS = {None: "tokens", "rows": "shuffled"}
"""ls's LAYOUT column: an extracted set holds each sequence's tokens in order; a shuffled copy holds rows."""


@app.command
def show(set_url: str, /, *, shards: bool = False, json_output: Json = False, flags: StoreFlags = StoreFlags()) -> int:
    """Describe a set from its manifest (--json: the manifest itself, plus its URL and NaN/Inf counts).

    Parameters
    ----------
    set_url
        Set URL: `<store>/<set_id>`.
    shards
        Also list every shard (index, tokens, bytes, sha256, stats).
    """
    from actcache.format import content, manifest, records
    from actcache.sets import inventory

    s = flags.open_set(set_url)
    m = dict(s.manifest)
    m.pop(records.SEAL, None)
    nf = {**m.get("non_finite", {}), **manifest.non_finite(m["shards"])}  # also for older manifests
    if json_output:
        if not shards:
            m.pop("shards")
        _print_json({"url": s.url, **m, "non_finite": nf})
        _warn_non_finite(s)
        _warn_mixed(s)
        return 0
    tok, ds, model = m.get("tokenization", {}), m.get("dataset", {}), m.get("model", {})
    state = "complete" if m.get("complete") else f"incomplete ({inventory.interrupted_detail(m, s.url, s.store.url)})"
    rev = f" @ {model['revision']}" if model.get("revision") else ""
    lines = [
        ("set", s.url),
        ("state", state),
        ("model", f"{model.get('name')}{rev} ({model.get('fingerprint')})"),
        ("hook", f"{m['hook']} (d={m['d']}, shape {m.get('hook_shape')})"),
        (
            "bound",
            f"its key's width: at most {s.key_width} values per token"
            if s.key_width is not None
            else f"the shards' stored size, not its key: {s.width.why_not}",
        ),
        ("dataset", f"{ds.get('path')} ({ds.get('fingerprint')})"),
        (
            "tokens",
            f"{m['n_tokens']} in {m['n_shards']} shards of up to {m['shard_tokens']}, context "
            f"{m['key']['tokens']['context_size']}, bos {'yes' if tok.get('prepend_bos') else 'no'}, "
            f"separator {tok.get('separator')}",
        )
        if m.get("layout") != "rows"
        else (
            "rows",
            f"{m['n_tokens']} in {m['n_shards']} shards of up to {m['rows_per_shard']}, shuffled copy of "
            f"{m['key']['source']} (seed {m['seed']}, {m['excluded']['rows']} rows excluded)",
        ),
        (
            "storage",
            f"{m['dtype']} (computed in {m.get('model_dtype') or m.get('source', {}).get('model_dtype')}), "
            f"codec {m['codec']}, {_human(m['bytes'])}",
        ),
        ("non-finite", f"{nf['inf']} inf, {nf['nan']} nan in {nf['shards']} shards"),
        ("updated", m.get("updated_at", "?")),
    ]
    cid = content.stored_id(m)
    if cid:  # what a request with the same token ids, from text or a column, reuses
        lines.insert(5, ("content", f"{cid} (the same token ids from text or from --token-column reuse this set)"))
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k.ljust(width)}  {console.printable(v)}")
    if shards:
        rows = [("INDEX", "TOKENS", "BYTES", "SHA256", "MEAN_NORM", "NAN", "INF")]
        for r in m["shards"]:
            st = (r.get("extra") or {}).get("stats") or {}
            rows.append(
                (
                    str(r["index"]),
                    str(r["n_tokens"]),
                    str(r["bytes"]),
                    r["sha256"][:16],
                    str(st.get("mean_l2_norm", "-")),
                    str(st.get("nan", "-")),
                    str(st.get("inf", "-")),
                )
            )
        print()
        _table(rows)
    _warn_non_finite(s)
    _warn_mixed(s)
    return 0


@app.command
def verify(set_url: str, /, *, json_output: Json = False, flags: StoreFlags = StoreFlags()) -> int:
    """Re-hash every shard of a set against its recorded sha256; exit 1 on any problem (also: shards its target asks
    for are missing, or were computed by another engine than its key's).

    Parameters
    ----------
    set_url
        Set URL: `<store>/<set_id>`.
    """
    from actcache import console
    from actcache.progress import Steps
    from actcache.sets.backfill import backfill  # a verified set made before content ids gets one

    # Until the shards to hash are known (on S3 the set is opened and listed: seconds), a status line.
    with console.status(f"reading {set_url}", terminal_only=True), Steps("verify", "shard") as progress:
        s = flags.open_set(set_url)
        problems = s.verify(on_shard=lambda _: progress.advance(), on_total=progress.total)
    # A set a run is writing (an extension rewrites its last shard before its manifest) is not judged: its data is
    # not what is wrong, and the repair verify would advise is that run's own work.
    flux = s.in_flux() if problems else None
    if flux:
        if json_output:
            _print_json({"url": s.url, "ok": False, "in_flux": f"{s.url} {flux}", "problems": []})
        print(
            f"{s.url} {flux}: its shards are not judged while it changes; verify it again once that run has ended",
            file=sys.stderr,
        )
        return 1
    indexed = None if problems else backfill(s)
    if json_output:
        _print_json(
            {
                "url": s.url,
                "ok": not problems,
                "n_shards": len(s),
                "n_tokens": s.n_tokens,
                "n_target_shards": s.n_target_shards,
                "missing": s.missing(),  # the first 10000
                "n_missing": s.n_missing(),
                "problems": [str(p) for p in problems],
                "content_indexed": indexed,  # the content id given to a set made before 0.5.0 (sets.backfill)
            }
        )
        _warn_non_finite(s)
        _warn_mixed(s)
        return 1 if problems else 0
    for p in problems:
        print(f"{s.url}: {p}", file=sys.stderr)
    _warn_non_finite(s)
    _warn_mixed(s)
    if problems:
        if s.manifest.get("layout") == "rows":  # a shuffled copy: its own command rewrites what is damaged
            rerun = "delete it and rerun the same `actcache shuffle`"
        elif not s.manifest.get("complete") and all(p.plain_rerun for p in problems):
            from actcache.sets import inventory  # only shards its target asks for are missing: a run was interrupted

            print(
                f"{s.url}: incomplete ({inventory.interrupted_detail(s.manifest, s.url, s.store.url)})", file=sys.stderr
            )
            rerun = f"run `{inventory.finish_command(s.url, s.store.url)}`"
        else:
            how = "" if all(p.plain_rerun for p in problems) else " with --verify-existing"
            rerun = f"rerun the same extract{how}"
        gone = s.n_missing()
        print(
            f"FAILED: {len(problems)} problem(s) in {len(s)} shards"
            + (f", {gone} of {s.n_target_shards} shards missing" if gone else "")
            + f"; {rerun} to {'finish' if rerun.startswith('run `') else 'repair'}",
            file=sys.stderr,
        )
        return 1
    print(f"OK: {len(s)} shards, {s.n_tokens} tokens, all checksums match")
    if indexed:
        print(
            f"{s.url}: indexed its content id {indexed} (a set made before content ids): the same token ids read "
            "another way now reuse it",
            file=sys.stderr,
        )
    return 0


@app.command
def diff(
    set_a: str,
    set_b: str,
    /,
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
    json_output: Json = False,
    flags: StoreFlags = StoreFlags(),
    b_storage_options: StorageOptions | None = None,
    b_aws_credentials_block: str | None = None,
) -> int:
    """Compare two sets shard by shard: tokens, and how far apart the activations are.

    Exit 0 when every shard holds the same tokens and activations within the tolerances (exact by default), 1
    when they differ (or one set has shards the other lacks), 2 when they cannot be compared (different
    shapes or shard sizes). Reads one pair of shards at a time. Use it to check a GPU set against a CPU one,
    or a reproduction (extract --like) against its original.

    Parameters
    ----------
    set_a
        Set URL: `<store>/<set_id>`.
    set_b
        Set URL: `<store>/<set_id>` (its store options: --b-storage-options, --b-aws-credentials-block).
    atol
        Absolute tolerance: values count as equal when |a - b| <= atol + rtol * |b| (as torch.isclose).
    rtol
        Relative tolerance (see --atol).
    b_storage_options
        JSON object passed to fsspec for SET_B's store (default: --storage-options).
    b_aws_credentials_block
        Prefect AwsCredentials block for SET_B's store (default: --aws-credentials-block).
    """
    from actcache import console
    from actcache.progress import Steps
    from actcache.sets import diff as diff_mod

    b_flags = StoreFlags(
        flags.storage_options if b_storage_options is None else b_storage_options,
        b_aws_credentials_block or flags.aws_credentials_block,
    )
    with console.status(f"reading {set_a} and {set_b}", terminal_only=True), Steps("diff", "shard") as progress:
        a, b = flags.open_set(set_a), b_flags.open_set(set_b)
        result = diff_mod.compare(
            a, b, atol=atol, rtol=rtol, on_shard=lambda _: progress.advance(), on_total=progress.total
        )
    if json_output:
        _print_json(result.to_json())
    else:
        for d in result.shards:
            if d.differs:
                print(
                    f"shard {d.index}: "
                    + ("tokens differ; " if not d.tokens_equal else "")
                    + f"{d.n_beyond} values differ, max abs {d.max_abs_diff:.6g}, max rel {d.max_rel_diff:.6g}"
                )
        for side, missing in (("A", result.only_in_a), ("B", result.only_in_b)):
            if missing:
                print(f"only in {side}: shards {_ranges(missing)}")
        print(result.summary())
    return 0 if result.same else 1


@app.command
def stats(set_url: str, /, *, json_output: Json = False, flags: StoreFlags = StoreFlags()) -> int:
    """Print a set's normalisation statistics (computed once if the manifest lacks them).

    Parameters
    ----------
    set_url
        Set URL: `<store>/<set_id>`.
    """
    from actcache import console
    from actcache.progress import Steps
    from actcache.sets import stats as stats_mod

    # The bar starts once the shards are to be read: stats already in the manifest, or an error, show none.
    with console.status(f"reading {set_url}", terminal_only=True), Steps("stats", "shard") as progress:
        result = stats_mod.compute(flags.ref(set_url), on_shard=lambda _: progress.advance(), on_total=progress.total)
    print(json.dumps(result, indent=1) if json_output else stats_mod.summary(result, len(result["mean"] or [])))
    return 0
