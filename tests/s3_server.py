"""A real S3 endpoint for tests: ``moto_server`` in its own process on 127.0.0.1, with IAM auth enforced.

Code under test reaches it only through its endpoint URL, as it would reach AWS or MinIO. Auth is on so
that wrong credentials and access denied behave as on AWS: after set-up, only the ``writer`` user's keys
are accepted, and the ``reader`` user may list and read but not write.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REGION = "us-east-1"
BUCKET = "actcache-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _policy(actions: list[str]) -> str:
    return json.dumps({"Version": "2012-10-17",
                       "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]})


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen
    bucket: str = BUCKET
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)
    """IAM user name -> (access key id, secret access key)."""

    def client(self, user: str = "writer"):
        import boto3

        key, secret = self.keys[user]
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=key,
                            aws_secret_access_key=secret)

    def env(self, user: str = "writer") -> dict[str, str]:
        """Environment for a process that should reach this server through the standard AWS variables."""
        key, secret = self.keys[user]
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_DEFAULT_REGION": REGION}

    def new_prefix(self) -> str:
        """A fresh ``s3://bucket/prefix`` URL (tests share the server but never each other's objects)."""
        return f"s3://{self.bucket}/{uuid.uuid4().hex[:12]}"

    def keys_under(self, url: str) -> dict[str, bytes]:
        """Every object below ``url`` read independently of actcache: {key relative to url: bytes}."""
        prefix = url.removeprefix(f"s3://{self.bucket}/").rstrip("/") + "/"
        c = self.client()
        out = {}
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"][len(prefix):]] = c.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"].read()
        return out

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def _post(url: str, body: bytes) -> None:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(req, timeout=10).read()


def start(log_path: Path, timeout: float = 30.0) -> S3Server:
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    log = open(log_path, "wb")  # noqa: SIM115 - handed to the child; closed with the process
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    log.close()
    server = S3Server(f"http://127.0.0.1:{port}", proc)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {proc.returncode}; see {log_path}")
            try:
                urllib.request.urlopen(f"{server.endpoint}/moto-api/", timeout=1).read()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not answer within {timeout:.0f} s; see {log_path}") from None
                time.sleep(0.1)
        _set_up(server)
    except BaseException:
        server.stop()
        raise
    return server


def _set_up(server: S3Server) -> None:
    """Bucket and IAM users while auth is off, then enforce auth for every later request."""
    import boto3

    root = {"endpoint_url": server.endpoint, "region_name": REGION, "aws_access_key_id": "setup",
            "aws_secret_access_key": "setup"}
    boto3.client("s3", **root).create_bucket(Bucket=server.bucket)
    iam = boto3.client("iam", **root)
    for user, actions in (("writer", ["s3:*"]), ("reader", ["s3:GetObject", "s3:ListBucket"])):
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName=f"{user}-s3", PolicyDocument=_policy(actions))
        k = iam.create_access_key(UserName=user)["AccessKey"]
        server.keys[user] = (k["AccessKeyId"], k["SecretAccessKey"])
    _post(f"{server.endpoint}/moto-api/reset-auth", b"0")
