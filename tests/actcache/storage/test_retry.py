"""Which storage errors are retried: the real botocore/aiohttp/s3fs exception types, and the upload task's rule."""

from __future__ import annotations

import aiohttp
import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
    SSLError,
)
from s3fs.errors import translate_boto_error

from actcache.errors import ActcacheError
from actcache.storage.failures import StoreUnavailable, translate
from actcache.storage.retry import is_transient


def client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
    )


TRANSIENT = [
    client_error("SlowDown", 503),
    client_error("InternalError", 500),
    client_error("ServiceUnavailable", 503),
    client_error("RequestTimeout", 400),
    client_error("Throttling", 400),
    client_error("BadGateway", 502),
    EndpointConnectionError(endpoint_url="http://x"),
    ConnectionClosedError(endpoint_url="http://x"),
    ReadTimeoutError(endpoint_url="http://x"),
    aiohttp.ServerDisconnectedError(),
    ConnectionResetError(),
    aiohttp.ClientPayloadError("truncated"),
    StoreUnavailable("x"),
]
PERMANENT = [
    client_error("AccessDenied", 403),
    client_error("NoSuchBucket", 404),
    client_error("InvalidAccessKeyId", 403),
    client_error("SignatureDoesNotMatch", 403),
    NoCredentialsError(),
    SSLError(endpoint_url="x", error="e"),
    FileNotFoundError("k"),
    PermissionError("p"),
    ValueError("v"),
    ActcacheError("bucket does not exist"),
]


@pytest.mark.parametrize("exc", TRANSIENT, ids=lambda e: type(e).__name__)
def test_transient(exc):
    assert is_transient(exc)
    if isinstance(exc, ClientError):
        assert is_transient(translate_boto_error(exc))  # as s3fs raises it: an OSError caused by the ClientError


@pytest.mark.parametrize("exc", PERMANENT, ids=lambda e: type(e).__name__)
def test_permanent(exc):
    assert not is_transient(exc)
    if isinstance(exc, ClientError):
        assert not is_transient(translate_boto_error(exc))


def test_translation_keeps_the_classification():
    assert isinstance(
        translate(translate_boto_error(client_error("SlowDown", 503)), "s3://b/p", "writing"), StoreUnavailable
    )
    denied = translate(translate_boto_error(client_error("AccessDenied", 403)), "s3://b/p", "writing")
    assert isinstance(denied, ActcacheError) and not is_transient(denied)
    assert translate(FileNotFoundError("s3://b/p/x"), "s3://b/p/x", "reading") is None  # "not there" stays so


def _failed(exc: BaseException):
    from prefect.states import Failed

    return Failed(data=exc)


def test_upload_task_retries_transient_errors_only():
    from actcache.tasks.upload import upload

    retry = upload.retry_condition_fn
    assert upload.retries >= 3
    assert retry(upload, None, _failed(StoreUnavailable("cannot reach http://x")))
    assert not retry(upload, None, _failed(ActcacheError("access denied while writing s3://b/p (AccessDenied)")))
    assert not retry(upload, None, _failed(ValueError("bug")))
