"""A real S3 endpoint for tests: ``moto_server`` in its own process on 127.0.0.1, with IAM auth enforced.

Code under test reaches it only through its endpoint URL, as it would reach AWS or MinIO. Auth is on so
that wrong credentials and access denied behave as on AWS: after set-up, only the ``writer`` user's keys
and the ``block`` user's keys (a second writer, for a Prefect AwsCredentials block) are accepted, and the
``reader`` user may list and read but not write.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
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
    return json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]})


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen
    bucket: str = BUCKET
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)
    """IAM user name -> (access key id, secret access key)."""
    log_path: Path | None = None
    recording: Path | None = None
    """Where moto records every request (``start(recording=...)``): replayed by ``restart``."""

    def client(self, user: str = "writer"):
        import boto3

        key, secret = self.keys[user]
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=key, aws_secret_access_key=secret
        )

    def env(self, user: str = "writer") -> dict[str, str]:
        """Environment for a process that should reach this server through the standard AWS variables."""
        key, secret = self.keys[user]
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": REGION,
        }

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
                out[obj["Key"][len(prefix) :]] = c.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"].read()
        return out

    def kill(self) -> None:
        """SIGKILL: requests in flight die with the process, as when a storage node crashes."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)

    def restart(self, timeout: float = 30.0) -> None:
        """Start again on the same port with every object it held (see ``_serve_restored``)."""
        self.kill()
        port = int(self.endpoint.rsplit(":", 1)[1])
        deadline = time.monotonic() + timeout
        while True:
            self.process = _launch(port, self.log_path, self.recording)
            try:
                _wait_up(self, self.log_path, max(1.0, deadline - time.monotonic()))
                return
            except RuntimeError:
                # Under load the killed server's port can take a moment to free (the new one exits at bind).
                if self.process.poll() is None or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


class SlowProxy:
    """A loopback TCP proxy in front of ``endpoint`` that holds each HTTP request ``delay_s`` before passing it on:
    S3 far away, or overloaded. Bytes are passed unchanged (signatures still match); ``requests`` counts the
    requests held. Use as a context manager; ``endpoint`` is the URL to give the code under test."""

    _REQUEST = re.compile(rb"^[A-Z]{3,7} /")

    def __init__(self, upstream: str, delay_s: float):
        host, port = upstream.removeprefix("http://").rsplit(":", 1)
        self.upstream, self.delay_s, self.requests = (host, int(port)), delay_s, 0
        self.lines: list[str] = []
        """Each request's first line, in the order they came."""
        self.first_answer = float("inf")
        """When the first request held was passed on (``time.monotonic()``): no answer came before it."""
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._open: list[socket.socket] = [self._listener]
        self._lock = threading.Lock()

    def __enter__(self) -> SlowProxy:
        threading.Thread(target=self._accept, name="slow-proxy", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            for s in self._open:
                with contextlib.suppress(OSError):
                    s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(self.upstream)
            except OSError:  # closed
                return
            with self._lock:
                self._open += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, requests: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if requests and self._REQUEST.match(data):  # a request starts: S3 is slow to answer it
                    with self._lock:
                        self.requests += 1
                        self.lines.append(data.split(b"\r\n", 1)[0].decode("latin-1"))
                    time.sleep(self.delay_s)
                    self.first_answer = min(self.first_answer, time.monotonic())
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def _post(url: str, body: bytes) -> None:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(req, timeout=10).read()


def _launch(port: int, log_path: Path, recording: Path | None) -> subprocess.Popen:
    env = dict(os.environ)
    args = [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)]
    if recording is not None:
        env.update(MOTO_ENABLE_RECORDING="1", MOTO_RECORDER_FILEPATH=str(recording))
        args = [sys.executable, __file__, str(port)]
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child; closed with the process
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    log.close()
    return proc


def _wait_up(server: S3Server, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"moto_server exited with {server.process.returncode}; see {log_path}")
        try:
            urllib.request.urlopen(f"{server.endpoint}/moto-api/", timeout=1).read()
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not answer within {timeout:.0f} s; see {log_path}") from None
            time.sleep(0.1)


def start(log_path: Path, timeout: float = 30.0, *, recording: Path | None = None) -> S3Server:
    """A server with IAM auth on; with ``recording``, one that can be restarted with its state, auth off
    (a replay would create new random IAM keys) and any key accepted."""
    port = free_port()
    server = S3Server(
        f"http://127.0.0.1:{port}", _launch(port, log_path, recording), log_path=log_path, recording=recording
    )
    try:
        _wait_up(server, log_path, timeout)
        if recording is None:
            _set_up(server)
        else:
            server.keys["writer"] = ("AKIAFAKERESTARTABLE0", "restartable-fake-secret")
            server.client().create_bucket(Bucket=server.bucket)
    except BaseException:
        server.stop()
        raise
    return server


def _set_up(server: S3Server) -> None:
    """Bucket and IAM users while auth is off, then enforce auth for every later request."""
    import boto3

    root = {
        "endpoint_url": server.endpoint,
        "region_name": REGION,
        "aws_access_key_id": "setup",
        "aws_secret_access_key": "setup",
    }
    boto3.client("s3", **root).create_bucket(Bucket=server.bucket)
    iam = boto3.client("iam", **root)
    for user, actions in (("writer", ["s3:*"]), ("block", ["s3:*"]), ("reader", ["s3:GetObject", "s3:ListBucket"])):
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName=f"{user}-s3", PolicyDocument=_policy(actions))
        k = iam.create_access_key(UserName=user)["AccessKey"]
        server.keys[user] = (k["AccessKeyId"], k["SecretAccessKey"])
    _post(f"{server.endpoint}/moto-api/reset-auth", b"0")


def _one_record_per_line(recording: Path) -> None:
    """moto's recorder writes a record and its newline in separate writes from the server's threads, so two
    concurrent requests can share a line, and a SIGKILL can cut the last record short; its replay would fail on
    either. Every whole record is kept in order; a cut one was a request never answered, so it is dropped."""
    decoder, records = json.JSONDecoder(), []
    for line in recording.read_text().splitlines():
        i, line = 0, line.strip()
        while i < len(line):
            try:
                record, i = decoder.raw_decode(line, i)
            except ValueError:
                break
            records.append(record)
            while i < len(line) and line[i].isspace():
                i += 1
    recording.write_text("".join(json.dumps(r) + "\n" for r in records))


def _serve_restored(port: int) -> None:
    """moto's own server on ``port``, holding everything its recording says was done before a restart.

    moto keeps state in process memory, and its replay API only runs once the server already answers: a client
    retrying at that moment would see a bucket that does not exist yet, which no real S3 restart shows. So the
    recording is replayed into this process's moto backends through a private port first, and the public port
    opens only then.
    """
    from moto.moto_api import recorder
    from moto.server import ThreadedMotoServer

    recording = Path(os.environ["MOTO_RECORDER_FILEPATH"])
    if recording.exists() and recording.stat().st_size:
        _one_record_per_line(recording)
        private = ThreadedMotoServer("127.0.0.1", free_port(), verbose=False)
        private.start()
        recorder.replay_recording(target_host=f"http://127.0.0.1:{private.get_host_and_port()[1]}")
        private.stop()
    public = ThreadedMotoServer("127.0.0.1", port, verbose=False)
    public.start()
    public._thread.join()


if __name__ == "__main__":
    _serve_restored(int(sys.argv[1]))
