"""Which storage errors are worth retrying (network, 5xx, throttling) and which are not.

Classified by class name along the exception chain, so that botocore, aiohttp and fsspec need not be
imported here (s3fs wraps their errors in OSErrors whose ``__cause__`` is the original).
"""

from __future__ import annotations

from actcache.errors import ActcacheError

_TRANSIENT_CODES = {
    "500",
    "502",
    "503",
    "504",
    "429",
    "408",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "TooManyRequests",
    "RequestLimitExceeded",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "OperationAborted",
}

# Connection resets, timeouts, truncated bodies: the same request may well succeed a moment later.
_TRANSIENT_TYPES = {
    "HTTPClientError",  # botocore: ConnectionClosedError, ReadTimeoutError, ResponseStreamingError
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "IncompleteReadError",
    "ResponseParserError",
    "ClientConnectionError",  # aiohttp: ClientOSError, ServerDisconnectedError, ServerTimeoutError
    "ClientPayloadError",
    "FSTimeoutError",  # fsspec
}
# Configuration problems that happen to look like network errors: retrying cannot fix them.
_PERMANENT_TYPES = {
    "SSLError",
    "ClientSSLError",
    "ClientConnectorCertificateError",
    "NoCredentialsError",
    "PartialCredentialsError",
    "InvalidURL",
}


def error_code(exc: BaseException) -> tuple[str, int] | None:
    """(code, HTTP status) of a botocore ClientError, None for anything else."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict) or "Error" not in response:
        return None
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return code, int(status)


def chain(exc: BaseException | None):
    """``exc`` and its causes, outermost first (a context hidden with ``from None`` is not followed)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)


def is_transient(exc: BaseException) -> bool:
    for e in chain(exc):
        if isinstance(e, ActcacheError):
            return bool(getattr(e, "transient", False))  # already classified by the store layer
        names = {t.__name__ for t in type(e).__mro__}
        if names & _PERMANENT_TYPES:
            return False
        if names & _TRANSIENT_TYPES or isinstance(e, (ConnectionError, TimeoutError)):
            return True
        coded = error_code(e)
        if coded is not None:
            code, status = coded
            return code in _TRANSIENT_CODES or status >= 500 or status in (408, 429)
    return False
