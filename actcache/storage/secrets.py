"""No credential enters actcache through an input: one rule for every value a user gives.

Inputs travel far: into manifests and records, Prefect flow parameters (stored in plain text, shown in the
UI), logs, exports' metadata, push cards and error lines. Rather than strip secrets at each of those places,
a value that holds one is refused where it enters (``ExtractConfig``, ``StoreRef``/``Store``, the endpoint
variables), in one line that names the input and never the value. Credentials come from the environment
instead: the AWS chain, ``~/.netrc`` for HTTP, or a Prefect block named by ``aws_credentials_block``.

``redact`` is the second line of defence for text actcache prints but did not write (a library's message).
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from actcache.errors import ActcacheError, opt

# Secret-looking names, by pattern rather than a fixed list: fsspec filesystems and boto pass options through
# (s3_additional_kwargs -> SSECustomerKey, client_kwargs -> aws_secret_access_key, adlfs account_key or
# connection_string, HTTP headers -> Authorization, presigned URLs' X-Amz-Signature, ...). Names are compared
# lowercased without separators.
SECRET_NAME = re.compile(
    r"secret|passw|token|credential|privat|signature|authoriz|^auth$|oauth|cookie|sessionid|connectionstring|"
    r"^user(name)?$|(access|account|customer|api|sas|encryption)key|key$|^sig$|^pass$|^pwd$|jwt|^session$"
)
# Values that hold a secret whatever their name: an AWS access key id, a connection string, the tokens of the
# hosts a dataset or model comes from (Hugging Face, GitHub, GitLab, Slack), which also travel in a URL's path.
_SECRET_VALUE = re.compile(
    r"\b(AKIA|ASIA)[0-9A-Z]{16}\b|AccountKey=|SharedAccessSignature=|"
    r"\bhf_[A-Za-z0-9]{30,}|\bgh[pousr]_[A-Za-z0-9]{36,}|\bgithub_pat_\w{40,}|\bglpat-[\w-]{20,}|\bxox[abprs]-[\w-]{10,}"
)
_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^\s'\"<>]+", re.I)
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3_ENDPOINT_URL")
HOW = (
    "give credentials through the environment instead (the AWS chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
    "AWS_PROFILE or an instance role; ~/.netrc for HTTP) or " + opt("aws_credentials_block") + " NAME"
)


def secret_name(name: Any) -> bool:
    return bool(SECRET_NAME.search(re.sub(r"[^a-z0-9]", "", str(name).lower())))


def secret_in(value: str) -> str | None:
    """What kind of credential ``value`` holds (in words, never the value), or None."""
    if _SECRET_VALUE.search(value):
        return "an access key"
    for url in _URL.findall(value):
        try:
            parts = urlsplit(url)
        except ValueError:
            return "a URL that cannot be parsed"
        if parts.password is not None:
            return "user:password@ in a URL"
        if parts.username:
            return "user@ in a URL (often a token)"
        if any(secret_name(k) for k, _ in _params(parts.query)):
            return "a credential in a URL's query string"
        if any(secret_name(k) for k, _ in _params(parts.fragment)):
            return "a credential in a URL's fragment"
        if any(secret_name(k) for k, _ in _path_params(parts.path)):
            return "a credential in a URL's path parameters"
    # A query, fragment or path parameter with no scheme before it (a repo id, a path: `user/repo?token=...`,
    # `/data/x#access_token=...`) is read the same way.
    rest, _, fragment = value.partition("#")
    path, _, query = rest.partition("?")
    if any(secret_name(k) for k, _ in _params(query) + _params(fragment) + _path_params(path)):
        return "a credential in a query string"
    return None


def _params(text: str) -> list[tuple[str, str]]:
    """A query's (or fragment's: OAuth puts ``access_token`` there) parameters, split at ``&`` and at ``;``, which
    some servers also take as a separator (and which Python stopped splitting at in 3.9.2)."""
    return [kv for part in text.split(";") for kv in parse_qsl(part, keep_blank_values=True)]


def _path_params(path: str) -> list[tuple[str, str]]:
    """A URL path's ``;name=value`` segment parameters (``;jsessionid=``)."""
    return [kv for segment in path.split("/") for kv in _params(segment.partition(";")[2])]


def check_value(value: Any, given_as: str) -> None:
    """Refuse (``ActcacheError``, exit 2) a string input that holds a credential; ``given_as`` names the input."""
    if isinstance(value, str):
        kind = secret_in(value)
        if kind:
            raise ActcacheError(f"{given_as} holds credentials ({kind}), which actcache would store and show; {HOW}")


def check_options(options: Any, given_as: str | None = None) -> None:
    """Refuse credentials at any depth of storage options (objects and lists), naming where, never the value."""
    given_as = given_as or opt("storage_options")
    stack: list[tuple[str, Any, int]] = [("", options, 0)]
    while stack:
        where, value, depth = stack.pop()
        if depth > 16:
            raise ActcacheError(f"{given_as} is nested too deeply (at {where}); pass a flat JSON object")
        if isinstance(value, dict):
            for k, v in value.items():
                path = f"{where}.{k}" if where else str(k)
                if secret_name(k):
                    raise ActcacheError(f"{given_as} must not hold credentials ({path}); {HOW}")
                stack.append((path, v, depth + 1))
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{where}[{i}]", v, depth + 1) for i, v in enumerate(value))
        elif isinstance(value, str) and secret_in(value):
            raise ActcacheError(f"{given_as} must not hold credentials ({where}); {HOW}")


def check_environment() -> None:
    """Refuse an endpoint variable holding credentials (botocore would fail on it with a raw error)."""
    for name in ENDPOINT_VARIABLES:
        check_value(os.environ.get(name), name)


# A parameter in a query, fragment or path segment (``?token=``, ``#access_token=``, ``&sig=``, ``;jsessionid=``),
# of a URL or of a path with no scheme (``/data/x?token=...``).
_PARAM = re.compile(r"([?#&;])([^=?#&;\s'\"<>{}]+)=([^&;#\s'\"<>{}]*)")


def redact(text: str) -> str:
    """``text`` with the credentials of any URL or path in it (user:password@, secret parameter values, known token
    shapes) replaced by ***. Every error actcache raises goes through it (``ActcacheError``), and so does every line
    the command line prints for an error, so a value given as input never comes back out, whatever names it."""

    def one(m: re.Match) -> str:
        url = m.group(0)
        if secret_in(url) is None:
            return url  # as written: nothing to hide
        try:
            parts = urlsplit(url)
        except ValueError:
            return "<url>"
        netloc = parts.netloc.rpartition("@")[2] if "@" in parts.netloc else parts.netloc
        netloc = ("***@" if "@" in parts.netloc else "") + netloc
        query, fragment = (
            "&".join(f"{k}={'***' if secret_name(k) else v}" for k, v in _params(text)) if "=" in text else text
            for text in (parts.query, parts.fragment)
        )
        path = re.sub(r";([^;/=]*)=([^;/]*)", lambda p: f";{p[1]}={'***' if secret_name(p[1]) else p[2]}", parts.path)
        return parts._replace(netloc=netloc, path=path, query=query, fragment=fragment).geturl()

    def param(m: re.Match) -> str:
        return f"{m[1]}{m[2]}=***" if secret_name(m[2]) and m[3] != "***" else m[0]

    return _PARAM.sub(param, _SECRET_VALUE.sub("***", _URL.sub(one, text)))
