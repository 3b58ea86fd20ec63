"""Commands that write or remove sets: cp, shuffle, export, push, rm, gc."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from cyclopts import Parameter

from actcache.cli.output import _done, _human, _print_json, _table
from actcache.cli.parser import Json, StoreFlags, app
from actcache.config import StorageOptions
from actcache.errors import ActcacheError


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
    from actcache import console
    from actcache.progress import Steps
    from actcache.sets.copy import copy_set

    to = StoreFlags(dest_storage_options or {}, dest_aws_credentials_block).ref(dest)
    # Until the shards to copy are known (the source opened, the destination listed): a status line.
    with console.status(f"comparing {src} with {dest}", terminal_only=True), Steps("cp", "shard") as progress:
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
    from actcache import console
    from actcache.progress import Steps
    from actcache.sets.shuffle import shuffle_set

    options = exclude.options()
    sources = [flags.ref(u) for u in (set_url, *more_sets)]
    if more_sets:  # the same tokens in the same shards, or nothing is written
        from actcache.read.alignment import check_aligned
        from actcache.read.reader import open_set

        with console.status(f"reading {len(sources)} sets", terminal_only=True):
            check_aligned([open_set(src) for src in sources])
    results = []
    for source in sources:
        target = None  # the source's store, with its options
        if out is not None or out_storage_options or out_aws_credentials_block:
            target = StoreFlags(out_storage_options or {}, out_aws_credentials_block).ref(out or source.split()[0].url)
        with (
            console.status(f"reading {source.url}", terminal_only=True),  # until the steps are known
            Steps("shuffle", "step") as progress,  # a spill file per source shard, then each output shard
        ):
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
    row-aligned, one activation column per set (named after its hook; HOOK#0, HOOK#1 where sets share one); sets
    of other tokens are refused.

    Parameters
    ----------
    set_url
        Set URL: `<store>/<set_id>`.
    out
        A new local folder (refused if it exists, or if it is a URL such as s3://...); the last argument.
    more
        More sets, then OUT.
    format
        saelens: SAELens's cached activations (one row per sequence); hf: one row per token.
    """
    from actcache import console
    from actcache.progress import Steps
    from actcache.sets.export import export_set

    options = exclude.options()
    urls, out = [set_url, out, *more][:-1], [set_url, out, *more][-1]  # export A B ... OUT
    # Until the shards are known (the sets opened, the datasets library imported): a status line.
    with console.status(f"reading {', '.join(urls)}", terminal_only=True), Steps("export", "shard") as progress:
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
    from actcache import console

    store, name = flags.ref(set_url).split()
    with console.status(f"listing {set_url}", terminal_only=True):  # ends before the question
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

    with console.status(f"looking for what no set needs in {store}", terminal_only=True):
        s = flags.store(store)
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
