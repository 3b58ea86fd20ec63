"""``actcache`` command line: every subcommand wires one module's function to flags and prints its result.

    actcache extract --hook blocks.1.hook_resid_post --max-tokens 32768   # offline demo defaults
    actcache extract --model gpt2 --dataset NeelNanda/pile-10k --hook blocks.6.hook_resid_post
    actcache --help                                                         # every subcommand, exit codes

Built with cyclopts, which Prefect already depends on: the ``extract`` flags are generated from
``ExtractConfig`` (its field docstrings are the help, ``Literal`` fields list their choices, booleans get
``--no-...``, every default is shown), and a subcommand is one decorated function whose docstring is its
help (why cyclopts: docs/architecture.md).

Output: results on stdout (``--json``: one JSON document, field names in README "Scripting"), progress, warnings
and messages on stderr. Exit codes (``actcache.errors``): 0 success, 1 failure (storage, network, a damaged set;
or: ``verify`` found problems, ``diff`` found differences), 2 bad input with one line saying what to fix, 130
interrupted; ``--debug`` anywhere on the line (or ``ACTCACHE_TRACEBACK=1``) prints the chain of causes first.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from cyclopts import App, CycloptsError, Parameter

from actcache import console, errors
from actcache.config import ExtractConfig, StorageOptions
from actcache.errors import ActcacheError

EXIT_CODES = (
    "Exit codes: 0 success; 1 failure (storage or network failed, Prefect API lost, a damaged set: rerun to "
    "resume; verify: problems found; diff: the sets differ); 2 bad input (one line on stderr says what to "
    "fix, and nothing was written); 130 interrupted. --debug (anywhere on the line, or ACTCACHE_TRACEBACK=1) "
    "also prints the whole chain of causes."
)


def _version() -> str:
    from importlib.metadata import version

    return f"actcache {version('actcache')}"


app = App(
    name="actcache",
    help="Extract transformer hook activations into content-addressed safetensors shards, on local disk or any "
    "fsspec store (S3, ...), as Prefect flows.",
    help_epilogue=EXIT_CODES,  # under every command's help too
    version=_version,
    help_format="markdown",
    version_format="plaintext",
)

FLAG_NAMES = {"rows_per_shard": "--shard-rows"}
"""Fields that errors name (``errors.opt``) whose flag is not ``--`` + the field's name."""


@app.meta.default
def _global_flags(
    *tokens: Annotated[str, Parameter(show=False, allow_leading_hyphen=True)],
    debug: Annotated[bool, Parameter(negative=())] = False,
    verbose: Annotated[bool, Parameter(negative=())] = False,
) -> None:
    """Never called: it lists the flags every command takes in every option table (cyclopts shows a meta app's
    parameters under each command's help). ``main`` takes them out of the line before parsing.

    Parameters
    ----------
    debug
        Print the whole chain of causes (tracebacks) before the one-line error; accepted anywhere before `--`. Also:
        ACTCACHE_TRACEBACK=1.
    verbose
        Also show Prefect's log lines on the console (each task run's state; they are always in Prefect's records).
    """


Json = Annotated[
    bool,
    Parameter(name="--json", negative=(), help="Print one JSON document on stdout (field names: README, 'Scripting')."),
]


@Parameter(name="*")
@dataclass(frozen=True)
class StoreFlags:
    storage_options: StorageOptions = field(default_factory=dict)
    """JSON object passed to fsspec for the store, e.g. '{"endpoint_url": "http://..."}'; never credentials."""
    aws_credentials_block: str | None = None
    """Prefect AwsCredentials block for an s3:// store (default: the AWS chain: env, profile, role)."""

    def ref(self, url: str):
        """The store (or set) at ``url`` with these options and block: one value (``StoreRef``)."""
        from actcache.storage.store import StoreRef

        return StoreRef(url, self.storage_options, self.aws_credentials_block)

    def store(self, url: str):
        return self.ref(url).open()

    def open_set(self, url: str):
        from actcache.read.reader import open_set

        return open_set(self.ref(url))


class _Flags(ExtractConfig):
    """ExtractConfig's fields as flags, checked only once ``--like`` has filled in the rest."""

    def __post_init__(self) -> None:
        pass


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2))


def _done(summary: str, result: Any, where: str, json_output: bool) -> int:
    """How a command that writes ends: what it did on stderr, then the result as JSON or where it is (stdout)."""
    print(summary, file=sys.stderr)
    if json_output:
        _print_json(dataclasses.asdict(result))
    else:
        print(where)
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _warn_non_finite(s: Any) -> None:
    """One warning line on stderr when the set holds NaN/Inf values, with what to do."""
    line = s.non_finite()
    if line:
        print(f"actcache: warning: {s.url}: {line}", file=sys.stderr)


def _warn_mixed(s: Any) -> None:
    """One warning line when the set's shards were written by different software or devices."""
    mixed = s.environments()
    if mixed:
        print(
            f"actcache: warning: {s.url}: its shards were computed in different environments (numerics may "
            f"differ in the last bits): {'; '.join(mixed.values())}",
            file=sys.stderr,
        )


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    rows = [tuple(console.printable(c) for c in r) for r in rows]  # fields of a set are whoever wrote it
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


# -- extract -----------------------------------------------------------------------------------------
@app.command
def extract(
    *,
    config: Annotated[_Flags, Parameter(name="*")] = _Flags(),
    like: str | None = None,
    json_output: Json = False,
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
    from actcache.format import manifest, records
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
    from actcache.progress import Steps

    s = flags.open_set(set_url)
    with Steps("verify", "shard") as progress:
        problems = s.verify(on_shard=lambda _: progress.advance(), on_total=progress.total)
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
    from actcache.progress import Steps
    from actcache.sets import diff as diff_mod

    b_flags = StoreFlags(
        flags.storage_options if b_storage_options is None else b_storage_options,
        b_aws_credentials_block or flags.aws_credentials_block,
    )
    a, b = flags.open_set(set_a), b_flags.open_set(set_b)
    with Steps("diff", "shard") as progress:
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


def _ranges(indices: list[int]) -> str:
    out, start = [], None
    for i, x in enumerate(indices):
        start = x if start is None else start
        if i + 1 == len(indices) or indices[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)


@app.command
def cp(
    src: str,
    dest: str,
    /,
    *,
    jobs: int = 4,
    verify_existing: bool = False,
    flags: StoreFlags = StoreFlags(),
    dest_storage_options: StorageOptions | None = None,
    dest_aws_credentials_block: str | None = None,
    json_output: Json = False,
) -> int:
    """Copy a set to another store (checksums verified; shards already there skipped); print its new URL.

    Parameters
    ----------
    src
        Set URL: `<store>/<set_id>`.
    dest
        Destination store (the set lands in `<dest>/<set_id>`).
    jobs
        Shards copied at once.
    verify_existing
        Re-hash shards already at the destination instead of trusting size and record.
    dest_storage_options
        JSON object passed to fsspec for the destination.
    dest_aws_credentials_block
        Prefect AwsCredentials block for the destination (default: the AWS chain).
    """
    from actcache.progress import Steps
    from actcache.sets.copy import copy_set

    to = StoreFlags(dest_storage_options or {}, dest_aws_credentials_block).ref(dest)
    with Steps("cp", "shard") as progress:
        result = copy_set(
            flags.ref(src),
            to,
            jobs=jobs,
            verify_existing=verify_existing,
            on_shard=lambda _: progress.advance(),
            on_total=progress.total,
        )
    return _done(
        f"copied {result.copied} shards ({_human(result.bytes_copied)}), skipped {result.skipped} already present",
        result,
        result.url,
        json_output,
    )


@Parameter(name="*")
@dataclass(frozen=True)
class ExcludeFlags:
    exclude_special_tokens: Annotated[bool, Parameter(negative=())] = False
    """Leave out rows whose token is BOS, EOS, pad or the separator (as the manifest records)."""
    exclude_ids: Annotated[str | None, Parameter(metavar="ID,ID")] = None
    """Leave out rows whose token id is one of these."""

    def options(self) -> dict[str, Any]:
        from actcache.read.exclude import parse_ids

        if self.exclude_special_tokens and self.exclude_ids:
            raise ActcacheError("pass --exclude-special-tokens or --exclude-ids, not both")
        return {
            "exclude_special": self.exclude_special_tokens,
            "exclude_ids": parse_ids(self.exclude_ids) if self.exclude_ids else [],
        }


@app.command
def shuffle(
    set_url: str,
    /,
    *more_sets: str,
    seed: int = 0,
    out: str | None = None,
    shard_rows: int | None = None,
    bucket_rows: int = 1 << 20,
    jobs: int = 8,
    exclude: ExcludeFlags = ExcludeFlags(),
    flags: StoreFlags = StoreFlags(),
    out_storage_options: StorageOptions | None = None,
    out_aws_credentials_block: str | None = None,
    json_output: Json = False,
) -> int:
    """Write a globally shuffled copy of a set (a new set; reruns skip it); print its URL.

    Several sets extracted from the same tokens (`--hook a,b`) are shuffled the same way: their copies stay
    row-aligned and read together as one dataset.

    Parameters
    ----------
    set_url
        Set URL: `<store>/<set_id>`.
    more_sets
        More set URLs, extracted from the same tokens (checked before anything is written).
    seed
        Fixes the permutation.
    out
        Store for the shuffled set (default: the source's store).
    shard_rows
        Rows per output shard (default: the source's tokens per shard).
    bucket_rows
        Rows gathered at once in the second pass (2^20 by default); memory is about four times this many rows plus
        three output shards, and it never changes the result.
    jobs
        Ranged reads in flight.
    out_storage_options
        JSON object passed to fsspec for the output store.
    out_aws_credentials_block
        Prefect AwsCredentials block for the output store (default: the AWS chain).
    """
    from actcache.progress import Steps
    from actcache.sets.shuffle import shuffle_set

    options = exclude.options()
    sources = [flags.ref(u) for u in (set_url, *more_sets)]
    if more_sets:  # the same tokens in the same shards, or nothing is written
        from actcache.read.dataset import check_aligned
        from actcache.read.reader import open_set

        check_aligned([open_set(src) for src in sources])
    results = []
    for source in sources:
        target = None  # the source's store, with its options
        if out is not None or out_storage_options or out_aws_credentials_block:
            target = StoreFlags(out_storage_options or {}, out_aws_credentials_block).ref(out or source.split()[0].url)
        with Steps("shuffle", "step") as progress:  # a spill file per source shard, then each output shard
            result = shuffle_set(
                source,
                out=target,
                seed=seed,
                rows_per_shard=shard_rows,
                **options,
                bucket_rows=bucket_rows,
                jobs=jobs,
                on_step=lambda _: progress.advance(),
                on_total=progress.total,
            )
        state = "already complete" if result.skipped else "written"
        print(
            f"{state}: {result.rows} rows in {result.shards} shards, {result.excluded_rows} rows excluded",
            file=sys.stderr,
        )
        results.append(result)
    if json_output:
        docs = [dataclasses.asdict(r) for r in results]
        _print_json(docs[0] if not more_sets else {"sets": docs})
    else:
        print("\n".join(r.url for r in results))
    return 0


@app.command
def export(
    set_url: str,
    out: str,
    /,
    *more: str,
    format: Literal["saelens", "hf"],
    exclude: ExcludeFlags = ExcludeFlags(),
    flags: StoreFlags = StoreFlags(),
    json_output: Json = False,
) -> int:
    """Write a set as a Hugging Face datasets folder (SAELens's layout, or one row per token); print its path.

    `export SET_A SET_B ... OUT`: sets extracted from the same tokens (`--hook a,b`) go into one folder,
    row-aligned, one activation column per hook; sets of other tokens are refused.

    Parameters
    ----------
    set_url
        Set URL: `<store>/<set_id>`.
    out
        A new local folder (refused if it exists); the last argument.
    more
        More sets, then OUT.
    format
        saelens: SAELens's cached activations (one row per sequence); hf: one row per token.
    """
    from actcache.progress import Steps
    from actcache.sets.export import export_set

    options = exclude.options()
    urls, out = [set_url, out, *more][:-1], [set_url, out, *more][-1]  # export A B ... OUT
    with Steps("export", "shard") as progress:
        result = export_set(
            [flags.ref(u) for u in urls] if len(urls) > 1 else flags.ref(urls[0]),
            out,
            format=format,
            **options,
            on_shard=lambda _: progress.advance(),
            on_total=progress.total,
        )
    return _done(
        f"{result.rows} rows ({result.dtype}), {result.excluded_tokens} tokens excluded; load with "
        f"datasets.load_from_disk({result.path!r})",
        result,
        result.path,
        json_output,
    )


@app.command
def push(
    set_url: str,
    repo_id: str,
    /,
    *,
    private: bool = False,
    revision: str | None = None,
    flags: StoreFlags = StoreFlags(),
    json_output: Json = False,
) -> int:
    """Upload a set to the Hugging Face Hub as a dataset repo (reruns resume); print its URL.

    Parameters
    ----------
    set_url
        Set URL: `<store>/<set_id>`.
    repo_id
        Dataset repo, e.g. user/gpt2-l6-resid (created if missing).
    private
        Create the repo private.
    revision
        Branch to commit to (created if missing; default: main).
    """
    from actcache import console
    from actcache.progress import Steps
    from actcache.sets.push import push_set

    # Until the files to upload are known (the repo listed, other sets' manifests read): a status line.
    with (
        console.status(f"comparing {set_url} with the hub's {repo_id}", terminal_only=True),
        Steps("push", "file") as progress,
    ):
        result = push_set(
            flags.ref(set_url),
            repo_id,
            private=private,
            revision=revision,
            on_commit=progress.advance,
            on_total=progress.total,
        )
    return _done(
        f"uploaded {result.uploaded} files ({_human(result.bytes_uploaded)}), {result.skipped} already on the hub",
        result,
        result.url,
        json_output,
    )


@app.command
def stats(set_url: str, /, *, json_output: Json = False, flags: StoreFlags = StoreFlags()) -> int:
    """Print a set's normalisation statistics (computed once if the manifest lacks them).

    Parameters
    ----------
    set_url
        Set URL: `<store>/<set_id>`.
    """
    from actcache.progress import Steps
    from actcache.sets import stats as stats_mod

    # The bar starts once the shards are to be read: stats already in the manifest, or an error, show none.
    with Steps("stats", "shard") as progress:
        result = stats_mod.compute(flags.ref(set_url), on_shard=lambda _: progress.advance(), on_total=progress.total)
    print(json.dumps(result, indent=1) if json_output else stats_mod.summary(result, len(result["mean"] or [])))
    return 0


@app.command
def hooks(model: str, /, *, revision: str | None = None, trust_remote_code: bool = False) -> int:
    """List the hook names a model offers.

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
    from actcache.inputs.model import ModelSpec, hook_names, resolve_model

    with console.status(f"loading {model} to list its hooks"):
        names = hook_names(resolve_model(ModelSpec(model, revision, trust_remote_code)))
    for name in names:
        print(name)
    return 0


# -- housekeeping ---------------------------------------------------------------------------------------
Yes = Annotated[bool, Parameter(name=["--yes", "-y"], negative=(), help="Do it without asking.")]


@app.command
def rm(set_url: str, /, *, yes: Yes = False, json_output: Json = False, flags: StoreFlags = StoreFlags()) -> int:
    """Remove one set (asks first unless --yes). Crash-safe: an interrupted rm leaves a set that ls shows as
    incomplete, never complete; run it again to finish.

    Its token cache stays: `actcache gc STORE` removes token caches that no set uses.

    Parameters
    ----------
    set_url
        Set URL: `<store>/<set_id>` (never a store, never a token cache).
    """
    from actcache.sets import cleanup, inventory

    if json_output and not yes:
        raise ActcacheError("--json cannot answer a confirmation prompt; add --yes")
    store, name = flags.ref(set_url).split()
    target = cleanup.find_set(store.open(), name)
    entry = inventory.describe_set(target.store, name)
    what = (
        f"{entry.state} set, {entry.model or '?'} {entry.hook or '?'}, "
        f"{'?' if entry.n_tokens is None else entry.n_tokens} tokens"
        if entry
        else "set"
    )
    summary = f"{target.url} ({what}; {len(target.files)} files, {_human(target.bytes)})"
    if not yes:
        if not sys.stdin.isatty():
            raise ActcacheError(
                "rm asks before removing and stdin is not a terminal; pass --yes to remove without asking"
            )
        print(f"Remove {summary}? [y/N] ", end="", file=sys.stderr, flush=True)
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            print("not removed", file=sys.stderr)
            return 1
    from actcache import console

    with console.status(f"removing {len(target.files)} files", terminal_only=True):
        cleanup.remove_set(target)
    if json_output:
        _print_json({"removed": target.url, "files": len(target.files), "bytes": target.bytes})
    else:
        print(f"removed {summary}")
    return 0


@app.command
def gc(
    store: str,
    /,
    *,
    yes: Yes = False,
    older_than: float = 24.0,
    json_output: Json = False,
    flags: StoreFlags = StoreFlags(),
) -> int:
    """List what no set needs in a store; with --yes, remove it.

    Collects temp files of writers that no longer run, S3 multipart uploads never completed, and token caches
    (`_tokens/<id>`) that no set's manifest uses. Never a set's shards, records or manifest. Run it while no
    extraction writes to the store: while any set has no manifest yet, every token cache is kept.

    Parameters
    ----------
    store
        A local folder or any fsspec URL (s3://bucket/prefix) holding sets.
    older_than
        Hours after which an unfinished S3 upload, or another host's temp file, counts as abandoned.
    """
    from actcache.sets import cleanup

    if older_than < 0:
        raise ActcacheError(f"--older-than must be >= 0 hours, got {older_than}")
    from actcache import console

    s = flags.store(store)
    with console.status(f"looking for what no set needs in {store}", terminal_only=True):
        report = cleanup.find_garbage(s, older_than * 3600)
        if yes:
            console.update_status(f"removing {len(report.items)} item(s)")
            cleanup.collect(s, report)
    if json_output:
        _print_json(
            {
                "store": s.url,
                "removed": yes,
                "bytes": report.bytes,
                "items": [g.to_json() for g in report.items],
                "notes": report.notes,
            }
        )
        return 0
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    if report.items:
        _table([("KIND", "BYTES", "URL", "WHY")] + [(g.kind, _human(g.bytes), g.url, g.reason) for g in report.items])
    verb = "removed" if yes else "would remove"
    tail = "" if yes or not report.items else "; rerun with --yes to remove them"
    print(f"{verb} {len(report.items)} item(s), {_human(report.bytes)}{tail}", file=sys.stderr)
    return 0


# -- running ----------------------------------------------------------------------------------------------
def _quiet_defaults() -> None:
    # Prefect's temporary server can take >20 s to start cold. Its telemetry has no network here: the server's
    # setting covers the server, DO_NOT_TRACK the client (which otherwise prints a notice on a terminal).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # actcache's own bar and status lines say what happens; the libraries' bars (a dataset's download,
    # transformers' "Writing model shards" while the demo model is built) would read as actcache's shards.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def _flags_given(argv: list[str]) -> frozenset[str]:
    """ExtractConfig fields named on the command line (``--x-y``, ``--no-x-y``, ``--x-y=v``)."""
    names = {f.name for f in dataclasses.fields(ExtractConfig)}
    given = set()
    for token in argv:
        if token == "--":
            break
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0].replace("-", "_")
            for n in (name, name.removeprefix("no_")):
                if n in names:
                    given.add(n)
    return frozenset(given)


def _parse_error(e: CycloptsError, argv: list[str]) -> str:
    """A cyclopts error as one line, worded as actcache words the same mistakes elsewhere."""
    from typing import Literal, get_args, get_origin

    token, target = getattr(e, "token", None), getattr(e, "target_type", None)
    if token is not None and target is not None and getattr(e, "msg", None) is None:
        if get_origin(target) is Literal:
            return (
                f"unsupported {token.keyword} {token.value!r}; choose one of "
                f"{', '.join(str(c) for c in get_args(target))}"
            )
        return f"{token.keyword}: invalid {getattr(target, '__name__', target)} value {token.value!r}"
    command = next((a for a in argv if not a.startswith("-")), None)
    where = f"actcache {command} --help" if command in app else "actcache --help"  # type: ignore[operator]
    return " ".join(str(e).split()) + f" (see `{where}`)"


def _debug_flag(argv: list[str], flag: str = "--debug") -> tuple[list[str], bool]:
    """``argv`` without ``flag`` (accepted anywhere before ``--``, as a global flag), and whether it was there."""
    end = argv.index("--") if "--" in argv else len(argv)
    rest = [a for a in argv[:end] if a != flag] + argv[end:]
    return rest, len(rest) != len(argv)


def _close_progress_bars() -> None:
    """Close the progress bars a failed command left open: a bar prints its last state when closed (or collected),
    which would otherwise come after the error line; the error is the last line of stderr."""
    std = sys.modules.get("tqdm.std")
    if std is not None:
        for bar in list(getattr(std.tqdm, "_instances", ())):
            bar.close()


def main(argv: list[str] | None = None) -> int:
    _quiet_defaults()
    argv, debug = _debug_flag(list(sys.argv[1:] if argv is None else argv))
    argv, verbose = _debug_flag(argv, "--verbose")
    from actcache import console

    # Prefect's run logs: its records only, unless --verbose
    with errors.debugging(debug), console.quieted(not verbose), errors.tracked_stderr():
        try:
            command, bound, ignored = app.parse_args(argv, exit_on_error=False, print_error=False)
            if "flags_given" in ignored:
                bound.arguments["flags_given"] = _flags_given(argv)
            return command(*bound.args, **bound.kwargs) or 0
        except CycloptsError as e:
            print(f"actcache: error: {_parse_error(e, argv)}", file=sys.stderr)
            return 2
        except BrokenPipeError:  # `actcache ls --json | head`: the reader left; say nothing, as git does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        except (Exception, KeyboardInterrupt) as e:
            _close_progress_bars()
            code = errors.report(e, debug=errors.debug_requested(), flag_names=FLAG_NAMES)
            if errors.user_error(e) is None and errors.lost_api(e):
                # Prefect's exit handlers would retry the dead API for seconds and log after our line.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(1)
            return code


if __name__ == "__main__":
    sys.exit(main())
