"""ExtractConfig validation: secrets at any depth of --storage-options are refused, by pattern."""

from __future__ import annotations

import pytest

from actcache.config import ExtractConfig
from actcache.errors import ActcacheError

SECRET = "s3cr3t-Zq81Lx0PvT"

REFUSED = [
    ({"key": SECRET}, "key"),
    ({"secret": SECRET}, "secret"),
    ({"token": SECRET}, "token"),
    ({"password": SECRET}, "password"),
    ({"username": SECRET}, "username"),
    ({"s3_additional_kwargs": {"SSECustomerKey": SECRET}}, "s3_additional_kwargs.SSECustomerKey"),
    ({"s3_additional_kwargs": {"SSECustomerKeyMD5": SECRET}}, "s3_additional_kwargs.SSECustomerKeyMD5"),
    ({"s3_additional_kwargs": {"sse_customer_key": SECRET}}, "s3_additional_kwargs.sse_customer_key"),
    ({"client_kwargs": {"aws_secret_access_key": SECRET}}, "client_kwargs.aws_secret_access_key"),
    ({"client_kwargs": {"aws_access_key_id": "AKIAABCDEFGHIJKLMNOP"}}, "client_kwargs.aws_access_key_id"),
    ({"client_kwargs": {"aws_session_token": SECRET}}, "client_kwargs.aws_session_token"),
    ({"a": {"b": {"c": {"d": {"SecretAccessKey": SECRET}}}}}, "a.b.c.d.SecretAccessKey"),
    ({"layers": [{"ok": 1}, {"Credentials": {"x": SECRET}}]}, "layers[1].Credentials"),
    ({"account_key": SECRET}, "account_key"),
    ({"connection_string": "DefaultEndpointsProtocol=https;AccountKey=" + SECRET}, "connection_string"),
    ({"conn": "DefaultEndpointsProtocol=https;AccountKey=" + SECRET}, "conn"),
    ({"sas_token": SECRET}, "sas_token"),
    ({"client_secret": SECRET}, "client_secret"),
    ({"private_key": SECRET}, "private_key"),
    ({"api_key": SECRET}, "api_key"),
    ({"apiKey": SECRET}, "apiKey"),
    ({"headers": {"Authorization": "Bearer " + SECRET}}, "headers.Authorization"),
    ({"headers": {"Cookie": "session=" + SECRET}}, "headers.Cookie"),
    ({"endpoint_url": f"http://user:{SECRET}@127.0.0.1:9000"}, "endpoint_url"),
    ({"client_kwargs": {"endpoint_url": f"https://u:{SECRET}@minio"}}, "client_kwargs.endpoint_url"),
    ({"anything": "AKIAABCDEFGHIJKLMNOP"}, "anything"),
    ({"signed_url": "https://x/y?sv=1&sig=" + SECRET}, "signed_url"),
    ({"KEY": SECRET}, "KEY"),
]


@pytest.mark.parametrize("options,where", REFUSED, ids=[w for _, w in REFUSED])
def test_secret_looking_storage_options_are_refused_at_any_depth(options, where):
    with pytest.raises(ActcacheError) as e:
        ExtractConfig(storage_options=options)
    msg = str(e.value)
    assert f"must not hold credentials ({where})" in msg and SECRET not in msg and "\n" not in msg
    assert "AWS_PROFILE" in msg and "aws_credentials_block NAME" in msg  # says how to pass them safely
    assert "--aws-credentials-block NAME" in e.value.for_cli() and e.value.fields[0] == "storage_options"


ACCEPTED = [
    {"endpoint_url": "http://127.0.0.1:9000"},
    {"client_kwargs": {"region_name": "eu-west-1", "endpoint_url": "https://minio.example:9000"}},
    {"config_kwargs": {"retries": {"max_attempts": 5}, "connect_timeout": 5}},
    {"s3_additional_kwargs": {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "arn:aws:kms:eu:1:key/abc"}},
    {"anon": True, "requester_pays": True, "use_ssl": False, "default_block_size": 1 << 20},
    {"profile": "research"},
    {"skip_instance_cache": True, "use_listings_cache": False},
]


@pytest.mark.parametrize("options", ACCEPTED)
def test_ordinary_storage_options_pass(options):
    assert ExtractConfig(storage_options=options).storage_options == options


def test_secrets_are_refused_through_every_entry_point(base_config, capsys):
    """The CLI (exit 2, one line, nothing written) and a deployment's parameters (before any worker runs it)."""
    from pathlib import Path

    from actcache.cli.app import main
    from actcache.flows.extract import extract_activations

    options = '{"s3_additional_kwargs": {"SSECustomerKey": "' + SECRET + '"}}'
    code = main(["extract", "--store", base_config.store, "--storage-options", options])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "SSECustomerKey" in err[0] and SECRET not in err[0]
    assert not Path(base_config.store).exists()
    with pytest.raises(Exception, match="must not hold credentials") as e:
        extract_activations.validate_parameters({"config": {"storage_options": {"x": [{"token": SECRET}]}}})
    assert SECRET not in str(e.value)


def test_deeply_nested_options_are_refused_not_a_recursion_error():
    deep: dict = {}
    node = deep
    for _ in range(5000):
        node["n"] = {}
        node = node["n"]
    with pytest.raises(ActcacheError, match="nested too deeply"):
        ExtractConfig(storage_options=deep)


def test_max_tokens_beyond_any_dataset_is_refused_in_one_line():
    assert ExtractConfig(max_tokens=10**18).max_tokens == 10**18  # "everything there is" is allowed
    with pytest.raises(ActcacheError) as e:
        ExtractConfig(max_tokens=10**18 + 1)
    assert "max_tokens 1000000000000000001 is above 10^18" in str(e.value) and "\n" not in str(e.value)
    assert e.value.for_cli().startswith("--max-tokens ")


@pytest.mark.parametrize("flag", ["--store", "--dataset"])
def test_an_input_that_is_not_utf8_is_refused_before_the_run(base_config, tmp_path, capsys, flag):
    """A path with a stray byte (held as a lone surrogate) failed as a raw UnicodeEncodeError once the flow run
    began (its parameters are JSON text), exit 1 with "rerun the same command". One line, exit 2, nothing written."""
    import os

    from actcache.cli.app import main

    odd = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9"))
    argv = ["extract", "--store", base_config.store, "--dataset", base_config.dataset]
    argv[argv.index(flag) + 1] = odd
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{flag} is not UTF-8 text" in err[0], err
    assert not os.path.exists(base_config.store) and not os.path.exists(odd)
