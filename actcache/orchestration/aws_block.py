"""Prefect ``AwsCredentials`` blocks: the filesystem options (keys, region, endpoint) a block by that name holds.

The secret is kept in memory and never logged, returned to a flow or put in an exception message.
"""

from __future__ import annotations

from typing import Any

from actcache.errors import ActcacheError, opt


def load_options(name: str) -> dict[str, Any]:
    """The s3fs options of the Prefect ``AwsCredentials`` block ``name``; one line saying what to fix if none."""
    try:
        from prefect_aws import AwsCredentials
    except ImportError:
        raise ActcacheError(f"{opt('aws_credentials_block')} needs prefect-aws; pip install prefect-aws") from None
    try:
        block: AwsCredentials = AwsCredentials.load(name, validate=True)  # type: ignore[assignment]  # sync here
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
    return opts
