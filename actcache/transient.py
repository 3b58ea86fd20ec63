"""Which storage errors are worth retrying (network, 5xx, throttling) and which are not."""

from __future__ import annotations

_TRANSIENT_CODES = {"500", "502", "503", "504", "SlowDown", "Throttling", "ThrottlingException",
                    "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable"}


def is_transient(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        name = type(exc).__name__
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                    "ClientConnectorError", "ServerDisconnectedError", "ClientOSError"):
            return True
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", "")) if hasattr(
            getattr(exc, "response", None), "get") else ""
        if code in _TRANSIENT_CODES:
            return True
        exc = exc.__cause__ or exc.__context__
    return False
