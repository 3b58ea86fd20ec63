"""Storage calls have deadlines, and an endpoint that is not S3 is named as such: each a one-line error in bounded
time, against real loopback sockets (one that accepts and never answers, one that answers 404 to everything)."""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from actcache.cli.app import main
from actcache.storage import store


@contextlib.contextmanager
def silent_endpoint() -> Iterator[str]:
    """A loopback endpoint that accepts connections and never answers; stopped (sockets closed) on exit."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    srv.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                held.append(srv.accept()[0])

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        t.join(5)
        for c in held:
            c.close()
        srv.close()


@contextlib.contextmanager
def not_found_endpoint() -> Iterator[str]:
    """A loopback HTTP server that answers 404 Not Found to every request (a wrong host or port behind a proxy)."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(404)
            self.send_header("Content-Length", "9")
            self.end_headers()
            self.wfile.write(b"Not Found")

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = answer

        def log_message(self, *args) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}"
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def fake_credentials(monkeypatch, tmp_path):
    """Credentials that sign requests, and no cached filesystem: s3fs caches one per option set, and the endpoint
    (from the environment, which each test sets) is not one of its options."""
    from s3fs import S3FileSystem

    S3FileSystem.clear_instance_cache()
    monkeypatch.setattr(S3FileSystem, "cachable", False)
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)


def one_line(capsys, code: int, expected_code: int, fragment: str) -> None:
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == expected_code and len(lines) == 1 and fragment in lines[0], err


def test_the_default_deadlines_add_up_to_under_a_minute():
    worst = (store.S3_ATTEMPTS + 1) * store.S3FS_RETRIES * (store.S3_READ_TIMEOUT + 3)  # + botocore's backoff
    assert worst <= 60 - 2 * store.S3_CONNECT_TIMEOUT


@pytest.mark.parametrize("read_timeout", [1, None], ids=["read_timeout 1 s", "defaults"])
def test_a_silent_endpoint_is_one_line_within_the_deadline(fake_credentials, monkeypatch, capsys, read_timeout):
    options = ["--storage-options", '{"config_kwargs": {"read_timeout": 1}}'] if read_timeout else []
    bound = 4 * (read_timeout + 3) if read_timeout else 60  # the README's promise: at most a minute
    with silent_endpoint() as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        start = time.monotonic()
        code = main(["ls", "s3://bucket/acts", *options])
        took = time.monotonic() - start
    one_line(capsys, code, 1, "accepted the connection but did not answer")
    assert took < bound, took


def test_an_endpoint_answering_404_to_everything_is_named_at_planning(
    fake_credentials, base_config, monkeypatch, capsys
):
    with not_found_endpoint() as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        code = main(["ls", "s3://bucket/acts"])
        one_line(capsys, code, 2, "not an S3 endpoint, or wrong bucket")
        from actcache.api import extract

        with pytest.raises(Exception, match="not an S3 endpoint, or wrong bucket"):
            extract(base_config.replace(store="s3://bucket/acts"))


def test_an_unknown_storage_option_is_one_line(fake_credentials, monkeypatch, capsys):
    with not_found_endpoint() as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        code = main(["ls", "s3://bucket/acts", "--storage-options", '{"endpiont_url": "http://x"}'])
    one_line(capsys, code, 2, "unknown storage option 'endpiont_url'")


@contextlib.contextmanager
def dripping_endpoint(every_s: float = 1.0) -> Iterator[str]:
    """A loopback endpoint that reads each request and answers it one byte every ``every_s`` seconds, without end:
    no read ever waits long enough to time out."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    srv.settimeout(0.2)
    stop = threading.Event()

    def drip(c: socket.socket) -> None:
        with contextlib.suppress(OSError), c:
            c.settimeout(2)
            c.recv(65536)
            body = b"HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\n" + b"X-Pad: " + b"a" * 100_000
            for i in range(len(body)):
                if stop.wait(every_s):
                    return
                c.sendall(body[i : i + 1])

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                threading.Thread(target=drip, args=(srv.accept()[0],), daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        t.join(5)
        srv.close()


def test_the_overall_deadline_is_at_most_a_minute_by_default():
    assert store.DEADLINE_S <= 60


def test_a_dripping_endpoint_ends_in_one_line_at_the_operation_deadline(fake_credentials, monkeypatch, capsys):
    """An endpoint that answers a byte a second never trips a read timeout (8 s); the operation's deadline ends
    it, in one line that names the deadline and how to raise it."""
    with dripping_endpoint() as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        start = time.monotonic()
        code = main(["ls", "s3://bucket/acts", "--storage-options", '{"deadline": 4}'])
        took = time.monotonic() - start
    one_line(capsys, code, 1, "took longer than its 4 s deadline")
    assert took < 4 + 6, took


@pytest.mark.parametrize("value", ["0", '"soon"', "true", "NaN", "Infinity", "-5"])
def test_a_deadline_that_is_not_a_positive_number_is_one_line(value, capsys):
    code = main(["ls", "s3://bucket/acts", "--storage-options", f'{{"deadline": {value}}}'])
    one_line(capsys, code, 2, "deadline in --storage-options must be a positive number of seconds")
