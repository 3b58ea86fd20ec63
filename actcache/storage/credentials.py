"""Credentials from a Prefect ``AwsCredentials`` block, resolved by name inside the store layer.

Only the block's name travels (as a flow parameter, in the CLI); the secret it holds is turned into
filesystem options here, kept in memory, and never logged, returned or put in an exception message.
"""

from __future__ import annotations

import functools
from typing import Any

from actcache.errors import ActcacheError, opt


@functools.lru_cache(maxsize=8)  # one Prefect API call per block per process, not one per Store
def _resolve(name: str) -> tuple[tuple[str, Any], ...]:
    try:
        from prefect_aws import AwsCredentials
    except ImportError:
        raise ActcacheError(
            f"{opt('aws_credentials_block')} needs prefect-aws, in actcache's extraction extra; "
            "pip install 'actcache[extract]'"
        ) from None
    try:
        block = AwsCredentials.load(name, validate=True)
    except ValueError:
        raise ActcacheError(
            f"no Prefect AwsCredentials block named {name!r}; create it (e.g. "
            f"`prefect block create aws-credentials`) or omit {opt('aws_credentials_block')}"
        ) from None
    except Exception as e:
        raise ActcacheError(
            f"cannot load the Prefect block {name!r} ({type(e).__name__}); check PREFECT_API_URL "
            "and that the Prefect server is up"
        ) from None
    try:
        creds = block.get_boto3_session().get_credentials()  # also resolves a profile or an assumed role
    except Exception as e:
        raise ActcacheError(
            f"the Prefect block {name!r} gives no usable AWS credentials ({type(e).__name__}); "
            "check its access key, profile or role"
        ) from None
    if creds is None:
        raise ActcacheError(f"the Prefect block {name!r} gives no AWS credentials; fill in its access key or profile")
    frozen = creds.get_frozen_credentials()
    opts: dict[str, Any] = {"key": frozen.access_key, "secret": frozen.secret_key}
    if frozen.token:
        opts["token"] = frozen.token
    if block.region_name:
        opts["client_kwargs"] = {"region_name": block.region_name}
    endpoint = block.aws_client_parameters.endpoint_url
    if endpoint:
        opts["endpoint_url"] = str(endpoint)
    return tuple(opts.items())


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
