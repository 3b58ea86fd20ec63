"""Storage failures as one line that says what to fix; part of the store layer.

Messages are built from the URL, the endpoint and the error code only, never from the server's text or
the request, so that no credential can reach a log line, an artifact or the terminal.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from actcache.errors import ActcacheError, Failure, opt
from actcache.storage.retry import chain, error_code, is_transient

_CHAIN_HINT = "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or " + opt("aws_credentials_block")
_BAD_CREDENTIALS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
}
DENIED = {"AccessDenied", "AllAccessDisabled", "403", "Forbidden", "AccountProblem"}


class StoreUnavailable(Failure):
    """The store could not be reached or was overloaded; the upload task retries this one."""

    transient = True


def _endpoint(exc: BaseException) -> str | None:
    url = (getattr(exc, "kwargs", None) or {}).get("endpoint_url")
    if not url:
        return None
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")  # no user:password@


def _names(exc: BaseException) -> set[str]:
    return {t.__name__ for t in type(exc).__mro__}


def translate(exc: BaseException, url: str, action: str) -> ActcacheError | None:
    """The one-line error for ``exc`` raised while ``action`` on ``url``, or None to let it propagate.

    A missing object is not translated (callers treat FileNotFoundError as "not there yet").
    """
    if isinstance(exc, ActcacheError):
        return None
    for e in chain(exc):
        if isinstance(e, TypeError) and "unexpected keyword argument" in str(e):
            name = str(e).rpartition("argument")[2].strip()  # the option's name, quoted; never a value
            return ActcacheError(
                f"unknown storage option {name} for {url}: the filesystem takes no such option; fix its spelling "
                "in " + opt("storage_options")
            )
        names = _names(e)
        if names & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}:
            return ActcacheError(
                f"no usable credentials for {url}; set {_CHAIN_HINT} "
                '(or {"anon": true} in ' + opt("storage_options") + " for a public bucket)"
            )
        if "ProfileNotFound" in names:  # botocore's message quotes the profile name: a value, not shown
            return ActcacheError(
                f"the AWS profile given for {url} (AWS_PROFILE, or profile in {opt('storage_options')}) is not in "
                "the AWS config files; fix its name, or set " + _CHAIN_HINT
            )
        if names & {"ReadTimeoutError", "FSTimeoutError", "ServerTimeoutError"}:
            where = _endpoint(e) or "the storage endpoint"
            return StoreUnavailable(
                f"{where} accepted the connection but did not answer while {action} {url} (read timeout, tried "
                "again); check that the server is up and is S3 (read_timeout in config_kwargs of "
                + opt("storage_options")
                + " for a slow one)"
            )
        if "EndpointConnectionError" in names or "ConnectTimeoutError" in names:
            where = _endpoint(e) or "the storage endpoint"
            return StoreUnavailable(
                f"cannot reach {where} while {action} {url}; check AWS_ENDPOINT_URL "
                "(or endpoint_url in " + opt("storage_options") + ") and that the server is up"
            )
        if names & {"SSLError", "ClientSSLError", "ClientConnectorCertificateError"}:
            return ActcacheError(
                f"TLS handshake failed while {action} {url}; check the endpoint's scheme "
                "(http:// or https://) and certificates"
            )
        coded = error_code(e)
        if coded is None:
            continue
        code, status = coded
        bucket = urlsplit(url).netloc or url
        if code == "NoSuchBucket":
            return ActcacheError(f"bucket {bucket!r} does not exist ({url}); create it or fix the store URL")
        if code in ("404", "NotFound") and action.startswith("listing"):
            # S3 answers a listing with NoSuchBucket or a list, never a bare 404: something else is answering.
            where = _endpoint(e) or "the storage endpoint"
            return ActcacheError(
                f"{where} answered 404 Not Found to a listing of {url}: not an S3 endpoint, or wrong bucket; "
                "check AWS_ENDPOINT_URL (or endpoint_url in " + opt("storage_options") + ") and the store URL"
            )
        if code == "InvalidBucketName":
            return ActcacheError(f"{bucket!r} is not a valid bucket name ({url}); fix the store URL")
        if code in _BAD_CREDENTIALS:
            return ActcacheError(
                f"the storage endpoint rejected the credentials for {url} ({code}); set valid ones: {_CHAIN_HINT}"
            )
        if code in DENIED or status == 403:
            return ActcacheError(
                f"access denied while {action} {url} ({code}); check the credentials "
                f"({_CHAIN_HINT}) and that they may read, write and list this bucket"
            )
        if code in ("PermanentRedirect", "301", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"):
            return ActcacheError(
                f"bucket {bucket!r} is in another region ({code}); set AWS_DEFAULT_REGION or "
                "client_kwargs.region_name in " + opt("storage_options")
            )
        if is_transient(e):
            return StoreUnavailable(
                f"{action} {url} failed: {code or 'error'} (HTTP {status}); the endpoint "
                "is overloaded or failing: retried, then rerun the same command to resume"
            )
        return None
    if is_transient(exc):
        reason = type(list(chain(exc))[-1]).__name__  # the root cause, e.g. ServerDisconnectedError
        return StoreUnavailable(
            f"{action} {url} failed: {reason}; the network or endpoint is unstable: "
            "retried, then rerun the same command to resume"
        )
    return None
