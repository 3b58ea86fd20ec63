"""``actcache`` command line: extract, ls, show, verify, cp, hooks.

    actcache extract --hook blocks.1.hook_resid_post --max-tokens 32768   # offline demo defaults
    actcache extract --model gpt2 --dataset NeelNanda/pile-10k --hook blocks.6.hook_resid_post
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import typing
from typing import Any

from actcache import errors


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, not usage + message
        self.exit(2, f"actcache: error: {message} (see `{self.prog} --help`)\n")


def _add_config_options(p: argparse.ArgumentParser) -> None:
    from actcache.config import ExtractConfig, field_docs

    docs = field_docs()
    hints = typing.get_type_hints(ExtractConfig)
    for f in dataclasses.fields(ExtractConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = docs.get(f.name, "")
        hint = hints[f.name]
        if hint is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif f.name == "storage_options":
            p.add_argument(flag, default=None, metavar="JSON", help=help_)
        else:
            kind = int if hint is int else str
            p.add_argument(flag, type=kind, default=default, help=f"{help_} (default: {default})")


def _add_store_options(p: argparse.ArgumentParser, prefix: str = "", what: str = "the store") -> None:
    p.add_argument(f"--{prefix}storage-options", metavar="JSON",
                   help=f"JSON object passed to fsspec for {what}, e.g. '{{\"endpoint_url\": \"http://...\"}}'")
    p.add_argument(f"--{prefix}aws-credentials-block", metavar="NAME",
                   help=f"Prefect AwsCredentials block for {what} (default: the AWS chain)")


def _store_ref(args: argparse.Namespace, url: str, prefix: str = ""):
    """The store (or set) at ``url`` with the options and credentials block given as flags."""
    from actcache.config import parse_storage_options
    from actcache.store import StoreRef

    prefix = prefix.replace("-", "_")
    return StoreRef(url, parse_storage_options(getattr(args, f"{prefix}storage_options")),
                    getattr(args, f"{prefix}aws_credentials_block"))


EXIT_CODES = ("exit codes: 0 success; 1 failure (storage or network failed, Prefect API lost, a damaged set): rerun "
              "to resume; 2 bad input: the one-line error says what to fix, and nothing was written. --debug (or "
              "ACTCACHE_TRACEBACK=1) also prints the whole chain of causes.")


def _add_exclusion_options(p: argparse.ArgumentParser) -> None:
    ex = p.add_mutually_exclusive_group()
    ex.add_argument("--exclude-special-tokens", action="store_true",
                    help="leave out rows whose token is BOS, EOS, pad or the separator (as the manifest records)")
    ex.add_argument("--exclude-ids", metavar="ID,ID", help="leave out rows whose token id is one of these")


def _exclusion(args: argparse.Namespace) -> dict[str, Any]:
    from actcache.exclude import parse_ids

    return {"exclude_special": args.exclude_special_tokens,
            "exclude_ids": parse_ids(args.exclude_ids) if args.exclude_ids else []}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="actcache", description="Extract one transformer hook's activations into cached shards.",
                epilog=EXIT_CODES)
    p.add_argument("--debug", action="store_true", help="on an error, also print its whole chain of causes")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    common = argparse.ArgumentParser(add_help=False)  # --debug after the command too (SUPPRESS: no default there)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an error, also print its whole chain of causes")
    sub.add_parser = functools.partial(sub.add_parser, parents=[common], epilog=EXIT_CODES)  # type: ignore[method-assign]
    ex = sub.add_parser("extract", help="extract a hook's activations (reruns skip stored shards)")
    _add_config_options(ex)
    ls = sub.add_parser("ls", help="list the sets in a store")
    ls.add_argument("store")
    _add_store_options(ls)
    for name, text in (("show", "print a set's manifest summary"), ("verify", "check every shard's checksum")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("set", help="set URL: <store>/<set_id>")
        _add_store_options(sp)
        if name == "show":
            sp.add_argument("--shards", action="store_true", help="also list every shard")
    cp = sub.add_parser("cp", help="copy a set to another store (checksums verified; present shards skipped)")
    cp.add_argument("src", help="set URL: <store>/<set_id>")
    cp.add_argument("dest", help="destination store (the set lands in <dest>/<set_id>)")
    _add_store_options(cp)
    _add_store_options(cp, prefix="dest-", what="the destination")
    cp.add_argument("--jobs", type=int, default=4, help="shards copied at once (default: 4)")
    cp.add_argument("--verify-existing", action="store_true",
                    help="re-hash shards already at the destination instead of trusting size and record")
    sh = sub.add_parser("shuffle", help="write a globally shuffled copy of a set (a new set; reruns skip it)")
    sh.add_argument("set", help="set URL: <store>/<set_id>")
    sh.add_argument("--seed", type=int, default=0, help="fixes the permutation (default: 0)")
    sh.add_argument("--out", metavar="STORE", help="store for the shuffled set (default: the source's store)")
    sh.add_argument("--shard-rows", type=int, help="rows per output shard (default: the source's tokens per shard)")
    sh.add_argument("--bucket-rows", type=int, default=1 << 20,
                    help="rows gathered at once in the second pass (default: 2^20); memory is about four times this "
                         "many rows plus three output shards, and it never changes the result")
    sh.add_argument("--jobs", type=int, default=8, help="ranged reads in flight (default: 8)")
    _add_exclusion_options(sh)
    _add_store_options(sh)
    _add_store_options(sh, prefix="out-", what="the output store")
    exp = sub.add_parser("export", help="write a set as a Hugging Face datasets folder (SAELens's or flat)")
    exp.add_argument("set", help="set URL: <store>/<set_id>")
    exp.add_argument("out", help="a new local folder (refused if it exists)")
    exp.add_argument("--format", required=True, choices=("saelens", "hf"),
                     help="saelens: SAELens's cached activations (one row per sequence); hf: one row per token")
    _add_exclusion_options(exp)
    _add_store_options(exp)
    pu = sub.add_parser("push", help="upload a set to the Hugging Face Hub as a dataset repo (reruns resume)")
    pu.add_argument("set", help="set URL: <store>/<set_id>")
    pu.add_argument("repo_id", help="dataset repo, e.g. user/gpt2-l6-resid (created if missing)")
    pu.add_argument("--private", action="store_true", help="create the repo private")
    pu.add_argument("--revision", help="branch to commit to (created if missing; default: main)")
    _add_store_options(pu)
    st = sub.add_parser("stats", help="print a set's normalisation statistics (computed once if missing)")
    st.add_argument("set", help="set URL: <store>/<set_id>")
    st.add_argument("--json", action="store_true", help="print the manifest's whole stats object as JSON")
    _add_store_options(st)
    hk = sub.add_parser("hooks", help="list a model's valid hook names")
    hk.add_argument("model")
    hk.add_argument("--revision")
    hk.add_argument("--trust-remote-code", action="store_true")
    return p


def cmd_extract(args: argparse.Namespace) -> int:
    from actcache import tempserver

    tempserver.start()  # first, so Prefect's temporary server boots while torch imports and the model loads
    from actcache.api import extract
    from actcache.config import ExtractConfig, parse_storage_options

    opts = {f.name: getattr(args, f.name) for f in dataclasses.fields(ExtractConfig)}
    opts["storage_options"] = parse_storage_options(args.storage_options)
    urls = extract(ExtractConfig(**opts))
    urls = [urls] if isinstance(urls, str) else urls
    _warn_non_finite(urls, opts["storage_options"], args.aws_credentials_block)
    print("\n".join(urls))
    return 0


def _warn_non_finite(urls: list[str], options: dict, block: str | None) -> None:
    from actcache.reader import open_set

    for url in urls:
        line = open_set(url, options, credentials_block=block).non_finite()
        if line:
            print(f"actcache: warning: {url}: {line}", file=sys.stderr)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_ls(args: argparse.Namespace) -> int:
    from actcache import layout, manifest

    store = _store_ref(args, args.store).open()
    store.check_reachable()
    rows = []
    for name in store.list_dirs():
        if not layout.SET_ID_RE.match(name) or name.startswith("t"):
            continue
        try:
            m = manifest.read(store, name)
        except manifest.NoManifest:
            rows.append((name, "?", "?", "-", "-", "-", "in progress (no manifest yet)"))
            continue
        except errors.ActcacheError as e:  # one damaged set must not hide the others
            rows.append((name, "?", "?", "-", "-", "-", f"damaged: {e}"))
            continue
        state = "complete" if m.get("complete") else "partial"
        nf = manifest.non_finite(m["shards"])
        bad = f"{nf['inf']} inf, {nf['nan']} nan" if nf["inf"] or nf["nan"] else "0"
        model = m.get("model", {}).get("name") if isinstance(m.get("model"), dict) else None
        rows.append((name, str(model or "?"), m["hook"], str(m["n_tokens"]), _human(m["bytes"]), bad, state))
    header = ("SET", "MODEL", "HOOK", "TOKENS", "BYTES", "NON-FINITE", "STATE")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip())
    return 0


def _open(args: argparse.Namespace):
    from actcache.reader import open_set

    return open_set(_store_ref(args, args.set))


def cmd_show(args: argparse.Namespace) -> int:
    from actcache import manifest, records

    s = _open(args)
    m = dict(s.manifest)
    shards = m.pop("shards")
    m.pop("key")
    m.pop(records.SEAL, None)
    m["non_finite"] = {**m.get("non_finite", {}), **manifest.non_finite(shards)}  # also for older manifests
    if args.shards:
        m["shards"] = shards
    print(json.dumps(m, indent=2))
    line = s.non_finite()
    if line:
        print(f"actcache: warning: {s.url}: {line}", file=sys.stderr)
    _warn_mixed(s)
    return 0


def _warn_mixed(s) -> None:
    """One warning line when the set's shards were written by different software or devices."""
    mixed = s.environments()
    if mixed:
        print(f"actcache: warning: {s.url}: its shards were computed in different environments (numerics may "
              f"differ in the last bits): {'; '.join(mixed.values())}", file=sys.stderr)


def cmd_verify(args: argparse.Namespace) -> int:
    s = _open(args)
    problems = s.verify()
    for p in problems:
        print(f"{s.url}: {p}", file=sys.stderr)
    line = s.non_finite()
    if line:
        print(f"actcache: warning: {s.url}: {line}", file=sys.stderr)
    _warn_mixed(s)
    if problems:
        if s.manifest.get("layout") == "rows":  # a shuffled copy: its own command rewrites what is damaged
            rerun = "delete it and rerun the same `actcache shuffle`"
        else:
            how = "" if all(p.plain_rerun for p in problems) else " with --verify-existing"
            rerun = f"rerun the same extract{how}"
        gone = len(s.missing())
        print(f"FAILED: {len(problems)} problem(s) in {len(s)} shards"
              + (f", {gone} of {s.n_target_shards} shards missing" if gone else "")
              + f"; {rerun} to repair", file=sys.stderr)
        return 1
    print(f"OK: {len(s)} shards, {s.n_tokens} tokens, all checksums match")
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from actcache.copy import copy_set

    progress = tqdm(unit="shard", desc="cp", file=sys.stderr)  # not Progress: no Prefect server for a copy
    result = copy_set(_store_ref(args, args.src), _store_ref(args, args.dest, "dest-"), jobs=args.jobs,
                      verify_existing=args.verify_existing, on_shard=lambda _: progress.update())
    progress.close()
    print(f"copied {result.copied} shards ({_human(result.bytes_copied)}), skipped {result.skipped} already present",
          file=sys.stderr)
    print(result.url)
    return 0


def cmd_shuffle(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from actcache.config import parse_storage_options
    from actcache.shuffle import shuffle_set

    progress = tqdm(unit="step", desc="shuffle", file=sys.stderr)
    result = shuffle_set(args.set, out=args.out, seed=args.seed, rows_per_shard=args.shard_rows, **_exclusion(args),
                         bucket_rows=args.bucket_rows, jobs=args.jobs,
                         storage_options=parse_storage_options(args.storage_options),
                         credentials_block=args.aws_credentials_block,
                         out_storage_options=parse_storage_options(args.out_storage_options),
                         out_credentials_block=args.out_aws_credentials_block,
                         on_step=lambda _: progress.update())
    progress.close()
    state = "already complete" if result.skipped else "written"
    print(f"{state}: {result.rows} rows in {result.shards} shards, {result.excluded_rows} rows excluded",
          file=sys.stderr)
    print(result.url)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from actcache.config import parse_storage_options
    from actcache.export import export_set

    progress = tqdm(unit="shard", desc="export", file=sys.stderr)
    result = export_set(args.set, args.out, format=args.format, **_exclusion(args),
                        storage_options=parse_storage_options(args.storage_options),
                        credentials_block=args.aws_credentials_block, on_shard=lambda _: progress.update())
    progress.close()
    print(f"{result.rows} rows ({result.dtype}), {result.excluded_tokens} tokens excluded", file=sys.stderr)
    print(result.path)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from actcache.config import parse_storage_options
    from actcache.push import push_set

    result = push_set(args.set, args.repo_id, private=args.private, revision=args.revision,
                      storage_options=parse_storage_options(args.storage_options),
                      credentials_block=args.aws_credentials_block)
    print(f"uploaded {result.uploaded} files ({_human(result.bytes_uploaded)}), {result.skipped} already on the hub",
          file=sys.stderr)
    print(result.url)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from actcache import stats
    from actcache.config import parse_storage_options

    progress = tqdm(unit="shard", desc="stats", file=sys.stderr)
    result = stats.compute(args.set, parse_storage_options(args.storage_options),
                           credentials_block=args.aws_credentials_block, on_shard=lambda _: progress.update())
    progress.close()
    print(json.dumps(result, indent=1) if args.json else stats.summary(result, len(result["mean"] or [])))
    return 0


def cmd_hooks(args: argparse.Namespace) -> int:
    from actcache.model import ModelSpec, hook_names, resolve_model

    for name in hook_names(resolve_model(ModelSpec(args.model, args.revision, args.trust_remote_code))):
        print(name)
    return 0


def _quiet_defaults() -> None:
    # Prefect's temporary server can take >20 s to start cold, and its telemetry has no network here.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def main(argv: list[str] | None = None) -> int:
    _quiet_defaults()
    args = build_parser().parse_args(argv)
    handler: Any = {"extract": cmd_extract, "ls": cmd_ls, "show": cmd_show, "verify": cmd_verify,
                    "cp": cmd_cp, "hooks": cmd_hooks, "stats": cmd_stats,
                    "shuffle": cmd_shuffle, "export": cmd_export, "push": cmd_push}[args.command]
    with errors.debugging(args.debug):
        try:
            return handler(args)
        except (Exception, KeyboardInterrupt) as e:
            code = errors.report(e, debug=errors.debug_requested())
            if errors.user_error(e) is None and errors.lost_api(e):
                # Prefect's exit handlers would retry the dead API for seconds and log after our line.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(1)
            return code


if __name__ == "__main__":
    sys.exit(main())
