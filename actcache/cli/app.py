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
import logging
import os
import sys

from cyclopts import CycloptsError
from cyclopts.exceptions import RepeatArgumentError, UnusedCliTokensError

from actcache import errors

# The commands register on ``app`` when their module is imported; --help lists them alphabetically.
from actcache.cli import extract, inspect, sets  # noqa: F401
from actcache.cli.parser import EXIT_CODES, FLAG_NAMES, app
from actcache.config import ExtractConfig

__all__ = ["EXIT_CODES", "FLAG_NAMES", "app", "main"]


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
    # Prefect's event and log services drain at exit and say so ("Still processing items: 1 items remaining..."),
    # after the summary or the error that must be the last line; --verbose keeps them.
    for name in ("EventsWorker", "APILogWorker"):
        logging.getLogger(name).setLevel(logging.ERROR)


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
    if isinstance(e, RepeatArgumentError) and getattr(e, "msg", None) is None:
        return f"{e.token.keyword} is given more than once; give it once (see `{where}`)"
    if isinstance(e, UnusedCliTokensError) and getattr(e, "msg", None) is None and e.unused_tokens:
        extra = ", ".join(repr(t) for t in e.unused_tokens)
        return f"`actcache {command}` takes fewer arguments: {extra} left over (see `{where}`)"
    return " ".join(str(e).split()) + f" (see `{where}`)"


LIST_OPTIONS = ("--hook", "--keep-columns", "--exclude-ids")
"""Options whose value is a comma-separated list: given more than once, their values join (``--hook a --hook b``
is ``--hook a,b``), as researchers repeat them."""


def _joined_lists(argv: list[str]) -> list[str]:
    """``argv`` with each repeated list option (``LIST_OPTIONS``, ``--x v`` or ``--x=v``) given once, its values
    joined by commas where it first stood."""
    end = argv.index("--") if "--" in argv else len(argv)
    out: list[str] = []
    first: dict[str, int] = {}
    i = 0
    while i < end:
        a = argv[i]
        name, eq, value = a.partition("=")
        if name in LIST_OPTIONS and (eq or i + 1 < end):
            if not eq:
                value, i = argv[i + 1], i + 1
            if name in first:
                out[first[name]] += f",{value}"
            else:
                first[name] = len(out)
                out.append(f"{name}={value}")
        else:
            out.append(a)
        i += 1
    return out + argv[end:]


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


VERBOSE_COMMANDS = ("extract",)
"""The commands that take ``--verbose``: it shows Prefect's log lines, and only these run Prefect flows."""


def _verbose_refused(argv: list[str]) -> str | None:
    """The one-line refusal of ``--verbose`` on a command that runs no Prefect flow (None where it is taken)."""
    chain = app.parse_commands(argv)[0]
    command = chain[0] if chain else None
    if command is None or command in VERBOSE_COMMANDS or command.startswith("-"):  # no command: help, --version
        return None
    takes = ", ".join(f"`actcache {c}`" for c in VERBOSE_COMMANDS)
    return f"--verbose is taken only by {takes} (it shows Prefect's log lines); {command} runs no Prefect flow"


def main(argv: list[str] | None = None) -> int:
    _quiet_defaults()
    argv, debug = _debug_flag(list(sys.argv[1:] if argv is None else argv))
    argv, verbose = _debug_flag(argv, "--verbose")
    argv = _joined_lists(argv)
    if verbose and (refused := _verbose_refused(argv)) is not None:
        print(f"actcache: error: {refused}", file=sys.stderr)
        return 2
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
