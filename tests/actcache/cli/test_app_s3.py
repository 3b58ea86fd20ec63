"""The CLI against S3 as a user runs it (a subprocess, the standard AWS variables): one line per mistake."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

ACTCACHE = str(Path(sys.executable).with_name("actcache"))


def actcache(*args: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    base.update(
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
        **env,
    )
    return subprocess.run([ACTCACHE, *args], env=base, capture_output=True, text=True, timeout=120, cwd=tmp_path)


def one_line_error(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The one line; exit 2 for what the user passed, 1 for a store that failed (unreachable, overloaded)."""
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("actcache: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.subprocess
@pytest.mark.parametrize("command", ["ls", "extract"])
def test_wrong_credentials(command, s3_server, tmp_path):
    env = {**s3_server.env("writer"), "AWS_SECRET_ACCESS_KEY": "this-is-not-the-secret"}
    url = s3_server.new_prefix()
    args = ["ls", url] if command == "ls" else ["extract", "--store", url, "--max-tokens", "256"]
    line = one_line_error(actcache(*args, env=env, tmp_path=tmp_path))
    assert "rejected the credentials" in line and "SignatureDoesNotMatch" in line and "AWS_ACCESS_KEY_ID" in line
    assert "this-is-not-the-secret" not in line and s3_server.keys["writer"][0] not in line


@pytest.mark.subprocess
def test_missing_bucket(s3_server, tmp_path):
    line = one_line_error(
        actcache(
            "extract",
            "--store",
            "s3://no-such-bucket/sets",
            "--max-tokens",
            "256",
            env=s3_server.env("writer"),
            tmp_path=tmp_path,
        )
    )
    assert "bucket 'no-such-bucket' does not exist" in line and "create it or fix the store URL" in line
    assert not (tmp_path / "activations").exists()


@pytest.mark.subprocess
def test_unreachable_endpoint(s3_server, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**s3_server.env("writer"), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    line = one_line_error(
        actcache("verify", f"s3://{s3_server.bucket}/sets/0123456789abcdef01234567", env=env, tmp_path=tmp_path), code=1
    )
    assert f"cannot reach http://127.0.0.1:{port}" in line and "AWS_ENDPOINT_URL" in line


@pytest.mark.subprocess
def test_endpoint_from_storage_options_flag(s3_server, tmp_path):
    env = {k: v for k, v in s3_server.env("writer").items() if k != "AWS_ENDPOINT_URL"}
    url = s3_server.new_prefix()
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=url.split("/", 3)[3] + "/x", Body=b"")
    proc = actcache(
        "ls", url, "--storage-options", f'{{"endpoint_url": "{s3_server.endpoint}"}}', env=env, tmp_path=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["SET", "MODEL", "HOOK", "LAYOUT", "TOKENS", "BYTES", "NON-FINITE", "STATE"]


@pytest.mark.subprocess
def test_no_credentials_anywhere(s3_server, tmp_path):
    line = one_line_error(
        actcache("ls", f"s3://{s3_server.bucket}/x", env={"AWS_ENDPOINT_URL": s3_server.endpoint}, tmp_path=tmp_path)
    )
    assert "no usable credentials" in line and "--aws-credentials-block" in line


@pytest.mark.subprocess
def test_credentials_block_for_a_local_store_is_refused(tmp_path):
    line = one_line_error(actcache("ls", str(tmp_path), "--aws-credentials-block", "x", env={}, tmp_path=tmp_path))
    assert "applies to s3:// stores" in line


def test_a_credential_in_storage_options_appears_in_no_error(extracted_set, s3_server, s3_env, tmp_path, capsys):
    """shuffle, export, push and stats take the store as one StoreRef: a secret passed in --storage-options
    (wrong or right) is refused in one line (exit 2, ``storage.secrets``) that shows it nowhere, traceback
    included."""
    import json

    from actcache.cli import app as cli
    from actcache.sets.shuffle import shuffle_set
    from actcache.storage.store import StoreRef

    key, right = s3_server.keys["writer"]
    wrong = "wrong-options-secret-Kd83Pq0Zx"
    on_s3 = f"{s3_server.new_prefix()}/{Path(extracted_set).name}"
    texts = []
    for secret in (wrong, right):
        opts = json.dumps({"key": key, "secret": secret})
        for argv in (
            ["shuffle", on_s3, "--storage-options", opts],
            ["shuffle", extracted_set, "--out", s3_server.new_prefix(), "--out-storage-options", opts],
            ["export", on_s3, str(tmp_path / "exported"), "--format", "hf", "--storage-options", opts],
            ["push", on_s3, "user/repo", "--storage-options", opts],
            ["stats", on_s3, "--storage-options", opts],
        ):
            if argv[1] == extracted_set and secret == right:
                continue  # would succeed: no error to look at
            code = cli.main([*argv, "--debug"])  # --debug: the whole chain of causes is printed too
            out = capsys.readouterr()
            assert code == 2 and out.err.strip().splitlines()[-1].startswith("actcache: error: "), out.err
            assert "must not hold credentials (key)" in out.err.strip().splitlines()[-1], out.err
            texts += [out.out, out.err]
    with pytest.raises(Exception) as e:  # the Python API, as a training script calls it
        shuffle_set(StoreRef(on_s3, {"key": key, "secret": wrong}))
    texts += [str(e.value), repr(e.value), "".join(traceback.format_exception(e.value))]
    assert texts and not [t for t in texts if wrong in t or right in t]
