"""Credentials from a Prefect ``AwsCredentials`` block, resolved by name inside the store layer.

Only the block's name travels (as a flow parameter, in the CLI); the secret it holds is turned into
filesystem options (read from Prefect by ``actcache.orchestration.aws_block``), kept in memory, and never
logged, returned or put in an exception message.
"""

from __future__ import annotations

import functools
from typing import Any

from actcache.orchestration import aws_block


@functools.lru_cache(maxsize=8)  # one Prefect API call per block per process, not one per Store
def _resolve(name: str) -> tuple[tuple[str, Any], ...]:
    return tuple(aws_block.load_options(name).items())


def block_options(name: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """``storage_options`` plus the credentials (and region/endpoint) of the block ``name``.

    What the caller set explicitly wins over the block, except the secrets themselves.
    """
    opts = dict(_resolve(name))
    merged = {**opts, **storage_options}
    client_kwargs = {**opts.get("client_kwargs", {}), **storage_options.get("client_kwargs", {})}
    if client_kwargs:
        merged["client_kwargs"] = client_kwargs
    for secret in ("key", "secret", "token"):
        if secret in opts:
            merged[secret] = opts[secret]
    return merged
