"""The ``actcache`` App (cyclopts), its global flags, and the flag types the commands share; the ``extract`` flags
are ExtractConfig's fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from cyclopts import App, Parameter

from actcache.config import ExtractConfig, StorageOptions

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
    verbose: Annotated[bool, Parameter(negative=(), show=False)] = False,
) -> None:
    """Never called: it lists the flags every command takes in every option table (cyclopts shows a meta app's
    parameters under each command's help). ``main`` takes them out of the line before parsing.

    Parameters
    ----------
    debug
        Print the whole chain of causes (tracebacks) before the one-line error; accepted anywhere before `--`. Also:
        ACTCACHE_TRACEBACK=1.
    verbose
        Shown under ``extract`` only, the one command that runs Prefect flows (see ``cli/extract.py``); every other
        command refuses it (``app.VERBOSE_COMMANDS``).
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
