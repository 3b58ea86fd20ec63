"""A fake Hugging Face Hub for tests: a real HTTP server on 127.0.0.1 that the unmodified clients reach at
``HF_ENDPOINT``, the way a user points them at a mirror or a private hub.

It speaks the part of the hub's HTTP API that huggingface_hub 2.x, transformers, datasets and TransformerLens
use (read from their sources): repo info, file resolution (HEAD/GET, ranges), tree and paths-info listings,
refs, commits, repo creation, preupload, the LFS batch API (basic and multipart transfers, upload URLs served
here) and the NDJSON commit endpoint. Errors carry the hub's ``X-Error-Code`` so that clients raise their usual
exceptions (``RepositoryNotFoundError``, ``RevisionNotFoundError``, ``EntryNotFoundError``, ``GatedRepoError``,
``HfHubHTTPError``...). Xet storage is not spoken: clients must run with ``HF_HUB_DISABLE_XET=1`` (which the
test set-up below does), as with any hub mirror that has no Xet backend.

Using it in tests (``tests/conftest.py``)
-----------------------------------------
huggingface_hub and datasets read ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_HUB_DISABLE_XET`` and ``HF_HOME``
into module constants *at import time*. So ``conftest.py``, before anything imports them, reserves the
session server's port (a bound socket, not yet listening), exports ``HF_ENDPOINT=http://127.0.0.1:PORT``,
``HF_HUB_DISABLE_XET=1`` and a session-private ``HF_HOME``, and keeps ``HF_HUB_OFFLINE=1``: every test stays
offline unless it asks for the hub.

* ``hub_server`` (session fixture): the :class:`HubServer`, started on first use on the reserved port.
* ``hub`` (function fixture): the same server, made reachable for this test only. It clears the request log and
  pending faults, and through ``monkeypatch`` (undone after the test) turns offline mode off in-process
  (``huggingface_hub.constants.HF_HUB_OFFLINE`` and ``datasets.config.HF_HUB_OFFLINE``, the constants the
  libraries consult at call time, as their own test suites do), sets ``HF_TOKEN`` to the server's write token,
  gives the test its own ``HF_HUB_CACHE`` and exports ``HF_HUB_OFFLINE=0``/``HF_DATASETS_OFFLINE=0`` so that
  subprocesses started with ``os.environ`` are online too. ``hub.env()`` is the same environment as a dict.

Two ways to run code under test:

1. **In-process** (fast): just call it inside a test that uses the ``hub`` fixture.
2. **Subprocess** (exactly what a user gets): ``subprocess.run([...], env={**os.environ, **hub.env()})``;
   the child imports the libraries with the environment already set.

Repo ids are global to the session server: take fresh ones from ``hub.new_repo_id("name")`` (``t<n>-<hex>/name``)
so that tests never see each other's repos, cached files or datasets cache entries.

Test API (all methods thread-safe; ``repo_type`` is ``"model"`` or ``"dataset"``)
------------------------------------------------------------------------------
``start(sock=None) -> HubServer``: serve on ``sock`` (a bound socket) or on a free port.

``HubServer`` attributes: ``endpoint`` (``http://127.0.0.1:PORT``), ``token`` (write), ``read_token`` (read
only; uploads with it get 403), ``user`` (the tokens' user name, the default namespace of ``create_repo``),
``page_size`` (tree/commits entries per page, 1000 as on the hub; lower it to test pagination),
``lfs_chunk_size`` (LFS objects larger than this are uploaded with the multipart transfer; default 64 MiB).

* ``add_model(repo_id, files, *, branch="main", message=None, private=False, gated=False) -> sha`` and
  ``add_dataset(...)``: create the repo if needed and commit ``files`` (``{path: bytes}``, or a local folder)
  as the *whole* content of ``branch`` (created from main's head when new). Returns the commit sha.
* ``commit(repo_id, files=None, *, delete=(), repo_type="model", branch="main", message=None) -> sha``:
  add/replace ``files`` and delete paths on top of ``branch``'s head (a new branch starts from main).
* ``move_branch(repo_id, branch, revision, *, repo_type="model")``: point ``branch`` (created if missing) at the
  commit that ``revision`` (branch, tag or sha) resolves to -- "the branch moved".
* ``tag(repo_id, tag, revision="main", *, repo_type="model")``, ``delete_branch(...)``.
* ``set_repo(repo_id, *, repo_type="model", private=None, gated=None, read_only=None)``: ``private`` repos are
  404/401 ``RepoNotFound`` without a valid token; ``gated`` ones answer ``GatedRepo`` (401 without a token, 403
  with one: the test user has not been granted access); ``read_only`` ones refuse uploads with 403.
* ``files(repo_id, revision="main", repo_type="model") -> {path: bytes}``, ``sha(repo_id, revision, repo_type)``,
  ``exists(repo_id, repo_type)``, ``lfs_objects(repo_id, repo_type) -> set of sha256`` (LFS blobs stored).
* ``fail_next(pattern, status=429, *, times=1, retry_after=1, method=None)``: the next ``times`` requests whose
  path matches the regex ``pattern`` (``re.search`` on the percent-decoded path, e.g. ``r"/resolve/"``,
  ``r"^/_lfs/put/"`` for LFS uploads, ``r"/commit/"``), and whose method is ``method`` if given, get ``status``
  (with ``Retry-After: retry_after`` unless None) instead of being served. Faults queue in order;
  ``clear_faults()``.
* ``requests`` -> list of :class:`Request` (``method``, ``path`` percent-decoded without query, ``query``,
  ``status``, ``auth`` in ``"none"|"valid"|"invalid"``) in arrival order, faults included;
  ``requests_matching(pattern, method=None)`` filters them the same way; ``clear_requests()``. The server is
  shared by the session, and a client an earlier test left behind (``datasets`` resolves files in threads) may
  still be talking to it: put this test's repo id in fault and log patterns (``rf"/{repo}/resolve/"``).
* ``stop()`` (the hub becomes unreachable: listening socket and open connections closed, state kept),
  ``restart()`` (same port, same state), ``close()``.

Behaviour worth knowing: a file is stored as LFS when its name matches the hub's default ``.gitattributes``
patterns (``*.safetensors``, ``*.bin``, ``*.parquet``, ``*.arrow``, ...), is over 10 MB or looks binary. LFS
files are served directly (200) with ``X-Linked-Etag``/``X-Linked-Size`` rather than redirected to a CDN.
``create_repo`` makes an initial commit holding ``.gitattributes``, as the hub does; ``add_model`` and
``add_dataset`` commit exactly the files given. The ``hub`` fixture resets ``page_size`` and ``lfs_chunk_size``.
A second server (``start()``) has its own port: in-process clients reach it only with an explicit
``endpoint=``, subprocesses through its ``env()``.

Client behaviours to plan tests around (huggingface_hub 2.4, datasets 5.2; read in their sources)
-----------------------------------------------------------------------------------------------
* ``HfApi.model_info``/``dataset_info``/``repo_info`` are single requests: a 429/5xx raises ``HfHubHTTPError``
  at once, a stopped hub ``httpx2.ConnectError``; so does the commit POST of ``create_commit``/``upload_*``.
  Tree listing, preupload and the LFS batch/PUT requests retry 429/5xx with backoff (1, 2, 4, 8, 8 s;
  ``Retry-After: n`` waits n + 1 s): keep ``times`` small and ``retry_after=0``.
* ``hf_hub_download``: the first HEAD is not retried; if the file is not cached it retries with backoff, also on
  connection errors (about 23 s against a stopped hub: prefer ``snapshot_download``, which falls back to the
  cache or raises ``LocalEntryNotFoundError`` at once). The GET is retried on 408/429 only.
* ``upload_large_folder`` no longer exists in huggingface_hub 2.4, and ``upload_folder``'s resumable
  multi-commit pipeline needs Xet; without Xet, ``upload_folder`` is one commit over LFS, and rerunning it after
  a failure uploads only the LFS objects the hub lacks (the batch API says so) and commits only changed files.
* ``datasets.load_dataset`` at the default revision asks ``datasets-server.<HF_ENDPOINT host>`` for a parquet
  export; that host does not resolve and datasets carries on. It picks one builder from the first config's
  files, so configs of one repo must share a format (parquet and jsonl in separate repos).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import itertools
import json
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

REPO_TYPES = {"models": "model", "datasets": "dataset"}
URL_PREFIX = {"model": "", "dataset": "datasets/"}
# The hub's default .gitattributes (abridged): these names are stored with git-lfs.
LFS_PATTERNS = (
    "*.7z",
    "*.arrow",
    "*.bin",
    "*.bz2",
    "*.ckpt",
    "*.ftz",
    "*.gz",
    "*.h5",
    "*.joblib",
    "*.lz4",
    "*.mlmodel",
    "*.model",
    "*.msgpack",
    "*.npy",
    "*.npz",
    "*.onnx",
    "*.ot",
    "*.parquet",
    "*.pb",
    "*.pickle",
    "*.pkl",
    "*.pt",
    "*.pth",
    "*.rar",
    "*.safetensors",
    "*.tar",
    "*.tflite",
    "*.tgz",
    "*.wasm",
    "*.xz",
    "*.zip",
    "*.zst",
    "*tfevents*",
)
LFS_SIZE = 10 * 1000 * 1000
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
_REPO_ACTIONS = {
    "revision",
    "tree",
    "paths-info",
    "refs",
    "commits",
    "preupload",
    "commit",
    "branch",
    "tag",
    "settings",
}
_SHA_RE = re.compile(r"[0-9a-f]{40}")
DEFAULT_PAGE_SIZE = 1000  # tree entries per page, as on the hub (50 with expand=true)
DEFAULT_LFS_CHUNK_SIZE = 64 * 1024 * 1024


def reserve_port() -> socket.socket:
    """A socket bound to a free loopback port but not listening: connections are refused until ``start``."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    return s


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _is_lfs(path: str, size: int, sample: bytes) -> bool:
    name = path.rsplit("/", 1)[-1]
    return size > LFS_SIZE or b"\0" in sample or any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS)


@dataclass(frozen=True, eq=False)
class Blob:
    data: bytes
    lfs: bool

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @cached_property
    def pointer(self) -> bytes:
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n"
        ).encode()

    @cached_property
    def oid(self) -> str:
        """The git object id: of the content, or of the LFS pointer file for LFS blobs."""
        return _git_oid(self.pointer if self.lfs else self.data)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.oid


def _blob(path: str, data: bytes) -> Blob:
    return Blob(bytes(data), _is_lfs(path, len(data), data[:512]))


@dataclass
class Commit:
    sha: str
    parent: str | None
    files: dict[str, Blob]
    title: str
    date: float


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    created: float
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)
    """LFS objects uploaded through the batch API (sha256 -> bytes), whether committed or not yet."""
    private: bool = False
    gated: bool = False
    read_only: bool = False

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.tags:
            return self.tags[revision]
        if _SHA_RE.fullmatch(revision) and revision in self.commits:
            return revision
        return None


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    """Percent-decoded path, without the query string."""
    query: str
    status: int
    auth: str
    """``none``, ``valid`` or ``invalid``: the bearer token the request carried."""


@dataclass
class _Fault:
    pattern: re.Pattern
    method: str | None
    status: int
    retry_after: int | None
    left: int


class HubError(Exception):
    """An error answer: status, hub error code (X-Error-Code) and message."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: Mapping[str, str] = (),
        body: Mapping[str, object] = (),
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, dict(headers)
        self.body = dict(body)
        """Fields the hub adds to the error's JSON (create_repo's 409 carries the existing repo's url)."""


class HubServer:
    def __init__(self, sock: socket.socket | None = None):
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], Repo] = {}
        self._faults: list[_Fault] = []
        self._log: list[Request] = []
        self._uploads: dict[str, tuple[str, str, str, int]] = {}  # ticket -> (repo_type, repo_id, oid, size)
        self._parts: dict[str, dict[int, bytes]] = {}
        self._counter = itertools.count(1)
        self._ids = itertools.count(1)
        self.user = "tester"
        self.token = "hf_write" + secrets.token_hex(12)
        self.read_token = "hf_read" + secrets.token_hex(12)
        self.page_size = DEFAULT_PAGE_SIZE
        self.lfs_chunk_size = DEFAULT_LFS_CHUNK_SIZE
        self._sock = sock if sock is not None else reserve_port()
        self.port = self._sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------------
    def _serve(self) -> None:
        httpd = _Server(("127.0.0.1", self.port), _Handler, bind_and_activate=False)
        httpd.hub = self
        httpd.socket.close()
        if self._sock is not None:  # the reserved socket, handed over once
            httpd.socket, self._sock = self._sock, None
        else:
            httpd.socket = socket.socket()
            httpd.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            httpd.socket.bind(("127.0.0.1", self.port))
        httpd.server_activate()
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=f"hub-server-{self.port}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Become unreachable (connections refused, open keep-alive connections cut); the state is kept."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()
        self._thread.join(timeout=10)

    def restart(self) -> None:
        """Serve again on the same port with the same repos."""
        self.stop()
        self._serve()

    def close(self) -> None:
        self.stop()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def env(self, token: str | None = None) -> dict[str, str]:
        """Environment for a process that should use this hub online, as a user would set it."""
        return {
            "HF_ENDPOINT": self.endpoint,
            "HF_TOKEN": token or self.token,
            "HF_HUB_OFFLINE": "0",
            "HF_DATASETS_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }

    def new_repo_id(self, name: str = "repo") -> str:
        """A repo id no other test uses: ``t<n>-<hex>/<name>``."""
        return f"t{next(self._ids)}-{secrets.token_hex(3)}/{name}"

    # -- state set-up ---------------------------------------------------------------------------------
    def add_model(
        self,
        repo_id: str,
        files: Mapping[str, bytes] | str | Path,
        *,
        branch: str = "main",
        message: str | None = None,
        private: bool = False,
        gated: bool = False,
    ) -> str:
        return self._add("model", repo_id, files, branch, message, private, gated)

    def add_dataset(
        self,
        repo_id: str,
        files: Mapping[str, bytes] | str | Path,
        *,
        branch: str = "main",
        message: str | None = None,
        private: bool = False,
        gated: bool = False,
    ) -> str:
        return self._add("dataset", repo_id, files, branch, message, private, gated)

    def _add(self, repo_type, repo_id, files, branch, message, private, gated) -> str:
        content = _read_files(files)
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
            if repo is None:
                repo = self._create(repo_type, repo_id)
            repo.private, repo.gated = private, gated
            return self._commit(
                repo,
                branch,
                {p: _blob(p, d) for p, d in content.items()},
                message or f"Add {len(content)} files",
                replace=True,
            )

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes] | str | Path | None = None,
        *,
        delete: Iterable[str] = (),
        repo_type: str = "model",
        branch: str = "main",
        message: str | None = None,
    ) -> str:
        content = _read_files(files) if files is not None else {}
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            changes: dict[str, Blob | None] = {p: _blob(p, d) for p, d in content.items()}
            changes.update({p: None for p in delete})
            return self._commit(repo, branch, changes, message or "Update files")

    def move_branch(self, repo_id: str, branch: str, revision: str, *, repo_type: str = "model") -> None:
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            repo.branches[branch] = self._resolve(repo, revision)

    def delete_branch(self, repo_id: str, branch: str, *, repo_type: str = "model") -> None:
        with self._lock:
            self._repo(repo_type, repo_id).branches.pop(branch)

    def tag(self, repo_id: str, tag: str, revision: str = "main", *, repo_type: str = "model") -> None:
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            repo.tags[tag] = self._resolve(repo, revision)

    def set_repo(
        self,
        repo_id: str,
        *,
        repo_type: str = "model",
        private: bool | None = None,
        gated: bool | None = None,
        read_only: bool | None = None,
    ) -> None:
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            for k, v in (("private", private), ("gated", gated), ("read_only", read_only)):
                if v is not None:
                    setattr(repo, k, v)

    # -- state inspection -----------------------------------------------------------------------------
    def exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def sha(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            return self._resolve(repo, revision)

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            return {p: b.data for p, b in repo.commits[self._resolve(repo, revision)].files.items()}

    def lfs_objects(self, repo_id: str, repo_type: str = "model") -> set[str]:
        with self._lock:
            return set(self._repo(repo_type, repo_id).lfs)

    # -- faults and the request log -------------------------------------------------------------------
    def fail_next(
        self, pattern: str, status: int = 429, *, times: int = 1, retry_after: int | None = 1, method: str | None = None
    ) -> None:
        with self._lock:
            self._faults.append(_Fault(re.compile(pattern), method, status, retry_after, times))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._log)

    def requests_matching(self, pattern: str, method: str | None = None) -> list[Request]:
        rx = re.compile(pattern)
        return [r for r in self.requests if (method is None or r.method == method) and rx.search(r.path)]

    def clear_requests(self) -> None:
        with self._lock:
            self._log.clear()

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for f in self._faults:
                if f.left > 0 and (f.method is None or f.method == method) and f.pattern.search(path):
                    f.left -= 1
                    return f
        return None

    def _record(self, req: Request) -> None:
        with self._lock:
            self._log.append(req)

    # -- internals on the state (callers hold the lock) --------------------------------------------------
    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        try:
            return self._repos[(repo_type, repo_id)]
        except KeyError:
            raise KeyError(f"no {repo_type} repo {repo_id!r} on the fake hub") from None

    def _resolve(self, repo: Repo, revision: str) -> str:
        sha = repo.resolve(revision)
        if sha is None:
            raise KeyError(f"{repo.repo_id!r} has no revision {revision!r}")
        return sha

    def _create(self, repo_type: str, repo_id: str, initial: dict[str, bytes] | None = None) -> Repo:
        """A new repo; with ``initial``, main starts with a commit of those files (as ``create_repo`` on the hub)."""
        repo = Repo(repo_type, repo_id, created=time.time())
        self._repos[(repo_type, repo_id)] = repo
        if initial is not None:
            self._commit(repo, "main", {p: _blob(p, d) for p, d in initial.items()}, "initial commit", replace=True)
        return repo

    def _commit(
        self, repo: Repo, branch: str, changes: Mapping[str, Blob | None], title: str, *, replace: bool = False
    ) -> str:
        parent = repo.branches.get(branch) or repo.branches.get("main")
        files = {} if replace or parent is None else dict(repo.commits[parent].files)
        for path, blob in changes.items():
            if blob is None:
                files.pop(path, None)
            else:
                files[path] = blob
        n = next(self._counter)
        h = hashlib.sha1(f"{repo.repo_type}/{repo.repo_id}\n{parent}\n{title}\n{n}\n".encode())
        for path in sorted(files):
            h.update(f"{path}\0{files[path].oid}\n".encode())
        sha = h.hexdigest()
        repo.commits[sha] = Commit(sha, parent, files, title, time.time())
        repo.branches[branch] = sha
        return sha


def _read_files(files: Mapping[str, bytes] | str | Path) -> dict[str, bytes]:
    if isinstance(files, Mapping):
        return {str(p).lstrip("/"): bytes(d) for p, d in files.items()}
    root = Path(files)
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".git" not in p.relative_to(root).parts
    }


# -- HTTP -------------------------------------------------------------------------------------------
class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    hub: HubServer

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    def process_request(self, request, client_address):
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._conns_lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - the request log is HubServer.requests
        pass

    def do_GET(self):
        self._handle()

    def do_HEAD(self):
        self._handle()

    def do_POST(self):
        self._handle()

    def do_PUT(self):
        self._handle()

    def do_DELETE(self):
        self._handle()

    # -- plumbing ------------------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        self.raw_segments = split.path.split("/")[1:]
        path = unquote(split.path)
        self.body = self._read_body()
        auth = self.headers.get("Authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        self.role = {hub.token: "write", hub.read_token: "read"}.get(token) if token else None
        auth_state = "none" if token is None else ("valid" if self.role else "invalid")
        self.extra_headers: dict[str, str] = {}
        fault = hub._take_fault(self.command, path)
        try:
            if fault is not None:
                headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
                raise HubError(fault.status, f"injected fault {fault.status}", headers=headers)
            if token is not None and self.role is None:
                raise HubError(401, "Invalid credentials in Authorization header")
            status = self._route(hub)
        except HubError as e:
            status = self._send_error(e)
        except Exception as e:  # a bug here must show as a 500 the test can see, not a hung client
            status = self._send_error(HubError(500, f"fake hub error: {type(e).__name__}: {e}"))
        hub._record(Request(self.command, path, split.query, status, auth_state))

    def _send(
        self, status: int, body: bytes = b"", content_type: str = "application/json", headers: Mapping[str, str] = ()
    ) -> int:
        self.send_response(status)
        for k, v in {**self.extra_headers, **dict(headers)}.items():
            self.send_header(k, v)
        if content_type:
            self.send_header("Content-Type", content_type)
        if "Content-Length" not in dict(headers):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass
        return status

    def _json(self, obj, status: int = 200, headers: Mapping[str, str] = ()) -> int:
        return self._send(status, json.dumps(obj).encode(), headers=headers)

    def _send_error(self, e: HubError) -> int:
        headers = {"X-Error-Message": e.message, **e.headers}
        if e.code:
            headers["X-Error-Code"] = e.code
        return self._json({"error": e.message, **e.body}, e.status, headers)

    # -- routing ---------------------------------------------------------------------------------------------
    def _route(self, hub: HubServer) -> int:
        segs = [unquote(s) for s in self.raw_segments]
        m = self.command
        if segs[:1] == ["api"] and len(segs) >= 2:
            if segs[1] in REPO_TYPES and len(segs) >= 3:
                return self._repo_api(hub, REPO_TYPES[segs[1]], segs[2:])
            if segs[1:] == ["whoami-v2"] and m == "GET":
                return self._whoami(hub)
            if segs[1:] == ["repos", "create"] and m == "POST":
                return self._create_repo(hub)
            if segs[1:] == ["repos", "delete"] and m == "DELETE":
                return self._delete_repo(hub)
            if segs[1:] == ["validate-yaml"] and m == "POST":
                return self._json({"errors": [], "warnings": []})
        if segs[:1] == ["_lfs"]:
            return self._lfs_transfer(hub, segs[1:])
        if len(segs) >= 5 and segs[-4:] == ["info", "lfs", "objects", "batch"] and m == "POST":
            repo_type, rest = ("dataset", segs[1:-4]) if segs[0] == "datasets" else ("model", segs[:-4])
            if rest and rest[-1].endswith(".git"):
                return self._lfs_batch(hub, repo_type, "/".join(rest)[:-4])
        repo_type, start = ("dataset", 1) if segs[0] == "datasets" else ("model", 0)
        if m in ("GET", "HEAD"):
            # A repo may be named "resolve" ("ns/resolve/resolve/main/f"): a namespaced repo that exists wins.
            two_part_first = self._known(hub, repo_type, segs[start : start + 2])
            for i in (start + 2, start + 1) if two_part_first else (start + 1, start + 2):
                if len(segs) > i + 2 and segs[i] == "resolve":
                    rev, rest = _split_revision(segs[i + 1 :])
                    return self._resolve_file(hub, repo_type, "/".join(segs[start:i]), rev, "/".join(rest))
        raise HubError(404, f"fake hub: no route for {m} {unquote(urlsplit(self.path).path)}")

    @staticmethod
    def _known(hub: HubServer, repo_type: str, parts: list[str]) -> bool:
        return (repo_type, "/".join(parts)) in hub._repos

    def _repo_api(self, hub: HubServer, repo_type: str, segs: list[str]) -> int:
        # "ns/name" unless the second segment is an action of a one-part repo ("gpt2/tree/main"); a namespaced repo
        # that exists wins, so a repo may be named like an action ("ns/tree").
        if len(segs) >= 2 and (segs[1] not in _REPO_ACTIONS or self._known(hub, repo_type, segs[:2])):
            repo_id, rest = f"{segs[0]}/{segs[1]}", segs[2:]
        else:
            repo_id, rest = segs[0], segs[1:]
        m = self.command
        with hub._lock:
            if not rest and m == "GET":
                return self._info(hub, self._readable(hub, repo_type, repo_id), "main")
            action = rest[0] if rest else ""
            if action == "revision" and len(rest) >= 2 and m == "GET":
                rev, _ = _split_revision(rest[1:], whole=True)
                return self._info(hub, self._readable(hub, repo_type, repo_id), rev)
            if action == "tree" and len(rest) >= 2 and m == "GET":
                rev, path = _split_revision(rest[1:])
                return self._tree(hub, self._readable(hub, repo_type, repo_id), rev, "/".join(path))
            if action == "paths-info" and len(rest) >= 2 and m == "POST":
                rev, _ = _split_revision(rest[1:], whole=True)
                return self._paths_info(hub, self._readable(hub, repo_type, repo_id), rev)
            if action == "refs" and m == "GET":
                return self._refs(self._readable(hub, repo_type, repo_id))
            if action == "commits" and len(rest) >= 2 and m == "GET":
                rev, _ = _split_revision(rest[1:], whole=True)
                return self._commits(hub, self._readable(hub, repo_type, repo_id), rev)
            if action == "preupload" and len(rest) >= 2 and m == "POST":
                rev, _ = _split_revision(rest[1:], whole=True)
                return self._preupload(hub, self._writable(hub, repo_type, repo_id), rev)
            if action == "commit" and len(rest) >= 2 and m == "POST":
                rev, _ = _split_revision(rest[1:], whole=True)
                return self._commit_api(hub, self._writable(hub, repo_type, repo_id), rev)
            if action == "branch" and len(rest) >= 2 and m in ("POST", "DELETE"):
                return self._branch_api(hub, self._writable(hub, repo_type, repo_id), "/".join(rest[1:]))
            if action == "tag" and len(rest) >= 2 and m in ("POST", "DELETE"):
                return self._tag_api(hub, self._writable(hub, repo_type, repo_id), "/".join(rest[1:]))
        raise HubError(404, f"fake hub: no route for {m} {unquote(urlsplit(self.path).path)}")

    # -- access ------------------------------------------------------------------------------------------------
    def _readable(self, hub: HubServer, repo_type: str, repo_id: str) -> Repo:
        repo = hub._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and self.role is None):
            raise HubError(401 if self.role is None else 404, "Repository not found", "RepoNotFound")
        if repo.gated:
            status = 401 if self.role is None else 403
            raise HubError(
                status,
                f"Access to {repo_type} {repo_id} is restricted and you are not in the authorized list.",
                "GatedRepo",
            )
        return repo

    def _writable(self, hub: HubServer, repo_type: str, repo_id: str) -> Repo:
        if self.role is None:
            raise HubError(401, "You must be authenticated to access this resource")
        repo = hub._repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if self.role != "write" or repo.read_only:
            raise HubError(403, f"You don't have the rights to create a commit in this {repo_type} repo")
        return repo

    def _commit_of(self, repo: Repo, revision: str) -> Commit:
        sha = repo.resolve(revision)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[sha]

    # -- read API ------------------------------------------------------------------------------------------------
    def _info(self, hub: HubServer, repo: Repo, revision: str) -> int:
        c = self._commit_of(repo, revision)
        blobs = self.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for p in sorted(c.files):
            s = {"rfilename": p}
            if blobs:
                b = c.files[p]
                s.update(size=len(b.data), blobId=b.oid)
                if b.lfs:
                    s["lfs"] = {"sha256": b.sha256, "size": len(b.data), "pointerSize": len(b.pointer)}
            siblings.append(s)
        author = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
        info = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": author,
            "sha": c.sha,
            "lastModified": _iso(c.date),
            "createdAt": _iso(repo.created),
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(b.data) for b in c.files.values()),
        }
        card = _card_data(c.files.get("README.md"))
        if card is not None:
            info["cardData"] = card
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
            config = _json_or_none(c.files.get("config.json"))
            if isinstance(config, dict):
                info["config"] = {k: config[k] for k in ("architectures", "model_type") if k in config}
                info["library_name"] = "transformers"
                info["tags"] = ["transformers"] + ([config["model_type"]] if "model_type" in config else [])
        expand = self.query.get("expand") or self.query.get("expand[]")
        if expand:
            info = {k: v for k, v in info.items() if k in {"_id", "id", *expand}}
        return self._json(info)

    def _entry(self, repo: Repo, c: Commit, path: str, expand: bool) -> dict | None:
        if path in c.files:
            b = c.files[path]
            e = {"type": "file", "oid": b.oid, "size": len(b.data), "path": path}
            if b.lfs:
                e["lfs"] = {"oid": b.sha256, "size": len(b.data), "pointerSize": len(b.pointer)}
        else:
            prefix = path + "/"
            inside = sorted((p, c.files[p].oid) for p in c.files if p.startswith(prefix))
            if not inside:
                return None
            e = {"type": "directory", "oid": hashlib.sha1(repr(inside).encode()).hexdigest(), "size": 0, "path": path}
        if expand:
            last = _last_commit(repo, c, path)
            e["lastCommit"] = {"id": last.sha, "title": last.title, "date": _iso(last.date)}
        return e

    def _tree(self, hub: HubServer, repo: Repo, revision: str, path: str) -> int:
        c = self._commit_of(repo, revision)
        path = path.strip("/")
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        expand = self.query.get("expand", ["false"])[0].lower() in ("1", "true")
        if path in c.files:
            entries = [path]
        else:
            prefix = path + "/" if path else ""
            below = [p[len(prefix) :] for p in c.files if p.startswith(prefix)]
            if path and not below:
                raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": c.sha})
            names: set[str] = set()
            for rel in below:
                parts = rel.split("/")
                stop = len(parts) if recursive else 1
                names.update(prefix + "/".join(parts[:i]) for i in range(1, stop + 1))
            # directories first, then files, each sorted: the hub's "tree first" order
            entries = sorted(names, key=lambda p: (p in c.files, p))
        page = max(1, hub.page_size // (20 if expand else 1))
        start = int(self.query.get("cursor", ["0"])[0])
        chunk = entries[start : start + page]
        headers = {}
        if start + page < len(entries):
            split = urlsplit(self.path)
            q = {k: v[0] for k, v in self.query.items() if k != "cursor"}
            q["cursor"] = str(start + page)
            url = f"{hub.endpoint}{split.path}?" + "&".join(f"{k}={quote(v)}" for k, v in q.items())
            headers["Link"] = f'<{url}>; rel="next"'
        return self._json([self._entry(repo, c, p, expand) for p in chunk], headers=headers)

    def _paths_info(self, hub: HubServer, repo: Repo, revision: str) -> int:
        c = self._commit_of(repo, revision)
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            form = json.loads(self.body or b"{}")
            paths, expand = form.get("paths", []), bool(form.get("expand"))
        else:
            form = parse_qs(self.body.decode())
            paths = form.get("paths", [])
            expand = form.get("expand", ["false"])[0].lower() in ("1", "true")
        out = [e for e in (self._entry(repo, c, p.strip("/"), expand) for p in paths) if e is not None]
        return self._json(out)

    def _refs(self, repo: Repo) -> int:
        def ref(kind, name, sha):
            return {
                "name": name,
                "ref": f"refs/{kind}/{name}" if not name.startswith("refs/") else name,
                "targetCommit": sha,
            }

        prs = [ref("heads", n, s) for n, s in sorted(repo.branches.items()) if n.startswith("refs/pr/")]
        return self._json(
            {
                "branches": [ref("heads", n, s) for n, s in sorted(repo.branches.items()) if not n.startswith("refs/")],
                "converts": [],
                "tags": [ref("tags", n, s) for n, s in sorted(repo.tags.items())],
                "pullRequests": prs,
            }
        )

    def _commits(self, hub: HubServer, repo: Repo, revision: str) -> int:
        c: Commit | None = self._commit_of(repo, revision)
        history = []
        while c is not None:
            history.append(
                {"id": c.sha, "title": c.title, "message": "", "authors": [{"user": hub.user}], "date": _iso(c.date)}
            )
            c = repo.commits.get(c.parent) if c.parent else None
        start = int(self.query.get("p", ["0"])[0])
        page = hub.page_size
        headers = {}
        if (start + 1) * page < len(history):
            headers["Link"] = f'<{hub.endpoint}{urlsplit(self.path).path}?p={start + 1}>; rel="next"'
        return self._json(history[start * page : (start + 1) * page], headers=headers)

    def _resolve_file(self, hub: HubServer, repo_type: str, repo_id: str, revision: str, path: str) -> int:
        with hub._lock:
            repo = self._readable(hub, repo_type, repo_id)
            c = self._commit_of(repo, revision)
            blob = c.files.get(path)
        self.extra_headers["X-Repo-Commit"] = c.sha
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound")
        size = len(blob.data)
        headers = {"ETag": f'"{blob.etag}"', "Accept-Ranges": "bytes", "Content-Length": str(size)}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(size)})
        start, end = 0, size - 1
        status = 200
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", rng)
            if not m or not (m.group(1) or m.group(2)):
                raise HubError(416, "Invalid range", headers={"Content-Range": f"bytes */{size}"})
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:
                start = max(0, size - int(m.group(2)))
            if start >= size or start > end:
                raise HubError(416, "Range Not Satisfiable", headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            headers["Content-Length"] = str(end - start + 1)
        return self._send(status, blob.data[start : end + 1], "application/octet-stream", headers)

    # -- write API -----------------------------------------------------------------------------------------------
    def _whoami(self, hub: HubServer) -> int:
        if self.role is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self._json(
            {
                "type": "user",
                "id": "0" * 24,
                "name": hub.user,
                "fullname": "Test User",
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": self.role}},
            }
        )

    def _repo_from_payload(self, hub: HubServer) -> tuple[str, str, dict]:
        payload = json.loads(self.body or b"{}")
        name, org = payload.get("name"), payload.get("organization")
        repo_type = payload.get("type") or "model"
        if not name or repo_type not in URL_PREFIX:
            raise HubError(400, f"invalid repo name/type: {name!r} {repo_type!r}")
        return repo_type, f"{org or hub.user}/{name}", payload

    def _create_repo(self, hub: HubServer) -> int:
        if self.role != "write":
            raise HubError(401 if self.role is None else 403, "You must use a write token to create a repo")
        repo_type, repo_id, payload = self._repo_from_payload(hub)
        url = f"{hub.endpoint}/{URL_PREFIX[repo_type]}{repo_id}"
        with hub._lock:
            if (repo_type, repo_id) in hub._repos:
                # huggingface_hub's create_repo(exist_ok=True) reads "url" from this answer, as the hub sends it.
                raise HubError(409, f"You already created this {repo_type} repo", body={"url": url})
            repo = hub._create(repo_type, repo_id, {".gitattributes": GITATTRIBUTES})
            repo.private = bool(payload.get("private")) or payload.get("visibility") == "private"
        return self._json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self, hub: HubServer) -> int:
        repo_type, repo_id, _ = self._repo_from_payload(hub)
        with hub._lock:
            self._writable(hub, repo_type, repo_id)
            del hub._repos[(repo_type, repo_id)]
        return self._send(200, b"", "")

    def _branch_for_write(self, repo: Repo, revision: str) -> str:
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return revision

    def _preupload(self, hub: HubServer, repo: Repo, revision: str) -> int:
        branch = self._branch_for_write(repo, revision)
        head = repo.commits[repo.branches[branch]]
        files = []
        for f in json.loads(self.body or b"{}").get("files", []):
            path, size = f["path"], int(f["size"])
            lfs = _is_lfs(path, size, base64.b64decode(f.get("sample", "")))
            remote = head.files.get(path)
            oid = None if remote is None else (remote.sha256 if remote.lfs else remote.oid)
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return self._json({"files": files, "commitOid": head.sha})

    def _commit_api(self, hub: HubServer, repo: Repo, revision: str) -> int:
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x.get("key") == "header"), {})
        if self.query.get("create_pr", ["0"])[0] in ("1", "true"):
            base = self._branch_for_write(repo, revision)
            n = 1 + sum(1 for b in repo.branches if b.startswith("refs/pr/"))
            branch = f"refs/pr/{n}"
            repo.branches[branch] = repo.branches[base]
        else:
            branch = self._branch_for_write(repo, revision)
            n = None
        head = repo.commits[repo.branches[branch]]
        parent = header.get("parentCommit")
        if parent and not head.sha.startswith(parent):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        changes: dict[str, Blob | None] = {}
        for item in lines:
            key, v = item.get("key"), item.get("value", {})
            if key == "file":
                data = base64.b64decode(v["content"]) if v.get("encoding") == "base64" else v["content"].encode()
                changes[v["path"]] = Blob(data, False)
            elif key == "lfsFile":
                if v["oid"] not in repo.lfs:
                    raise HubError(
                        400,
                        f"Your push was rejected because an LFS pointer pointed to a file that "
                        f"does not exist: {v['path']} ({v['oid']})",
                    )
                changes[v["path"]] = Blob(repo.lfs[v["oid"]], True)
            elif key == "deletedFile":
                if v["path"] not in head.files:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                changes[v["path"]] = None
            elif key == "deletedFolder":
                prefix = v["path"].rstrip("/") + "/"
                changes.update({p: None for p in head.files if p.startswith(prefix)})
        sha = hub._commit(repo, branch, changes, header.get("summary") or "Commit")
        prefix = f"{hub.endpoint}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}"
        return self._json(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{prefix}/commit/{sha}",
                "commitMessage": header.get("summary", ""),
                "hookOutput": "",
                "pullRequestUrl": f"{prefix}/discussions/{n}" if n else None,
            }
        )

    def _branch_api(self, hub: HubServer, repo: Repo, branch: str) -> int:
        if self.command == "DELETE":
            if repo.branches.pop(branch, None) is None:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            return self._json({})
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = json.loads(self.body or b"{}").get("startingPoint") or "main"
        repo.branches[branch] = self._commit_of(repo, start).sha
        return self._json({})

    def _tag_api(self, hub: HubServer, repo: Repo, name: str) -> int:
        if self.command == "DELETE":
            if repo.tags.pop(name, None) is None:
                raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
            return self._json({})
        tag = json.loads(self.body or b"{}").get("tag")
        if tag in repo.tags:
            raise HubError(409, f"Reference already exists: refs/tags/{tag}")
        repo.tags[tag] = self._commit_of(repo, name).sha
        return self._json({})

    # -- LFS ------------------------------------------------------------------------------------------------------
    def _lfs_batch(self, hub: HubServer, repo_type: str, repo_id: str) -> int:
        payload = json.loads(self.body or b"{}")
        with hub._lock:
            repo = (
                self._writable(hub, repo_type, repo_id)
                if payload.get("operation") == "upload"
                else self._readable(hub, repo_type, repo_id)
            )
            objects, multipart = [], False
            for o in payload.get("objects", []):
                oid, size = o["oid"], int(o["size"])
                obj = {"oid": oid, "size": size, "authenticated": True}
                if oid not in repo.lfs:
                    ticket = secrets.token_hex(16)
                    hub._uploads[ticket] = (repo_type, repo_id, oid, size)
                    verify = {"href": f"{hub.endpoint}/_lfs/verify/{ticket}", "header": {}}
                    if size > hub.lfs_chunk_size:
                        multipart = True
                        n = -(-size // hub.lfs_chunk_size)
                        header = {"chunk_size": str(hub.lfs_chunk_size)}
                        header.update({str(i): f"{hub.endpoint}/_lfs/part/{ticket}/{i}" for i in range(1, n + 1)})
                        upload = {"href": f"{hub.endpoint}/_lfs/complete/{ticket}", "header": header}
                    else:
                        upload = {"href": f"{hub.endpoint}/_lfs/put/{ticket}"}
                    obj["actions"] = {"upload": upload, "verify": verify}
                objects.append(obj)
        body = {"transfer": "multipart" if multipart else "basic", "objects": objects, "hash_algo": "sha256"}
        return self._send(200, json.dumps(body).encode(), "application/vnd.git-lfs+json")

    def _lfs_transfer(self, hub: HubServer, segs: list[str]) -> int:
        """The 'storage' side: presigned-style URLs, authorised by their ticket like S3 URLs (no token)."""
        if len(segs) < 2 or segs[1] not in hub._uploads:
            raise HubError(403, "Request has expired or the signature does not match")
        kind, ticket = segs[0], segs[1]
        repo_type, repo_id, oid, size = hub._uploads[ticket]
        if kind == "part" and self.command == "PUT" and len(segs) == 3:
            with hub._lock:
                hub._parts.setdefault(ticket, {})[int(segs[2])] = self.body
            return self._send(200, b"", "", {"ETag": f'"{hashlib.md5(self.body).hexdigest()}"'})
        if kind == "complete" and self.command == "POST":
            payload = json.loads(self.body or b"{}")
            with hub._lock:
                parts = hub._parts.pop(ticket, {})
            try:
                data = b"".join(parts[p["partNumber"]] for p in sorted(payload["parts"], key=lambda p: p["partNumber"]))
            except KeyError as e:
                raise HubError(400, f"missing part {e}") from None
            return self._store_lfs(hub, repo_type, repo_id, oid, size, data)
        if kind == "put" and self.command == "PUT":
            return self._store_lfs(hub, repo_type, repo_id, oid, size, self.body)
        if kind == "verify" and self.command == "POST":
            with hub._lock:
                present = oid in hub._repo(repo_type, repo_id).lfs
            if not present:
                raise HubError(404, f"object {oid} not found")
            return self._json({})
        raise HubError(405, "Method not allowed")

    def _store_lfs(self, hub, repo_type, repo_id, oid, size, data: bytes) -> int:
        if len(data) != size or hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, f"uploaded object does not match its oid/size ({len(data)} bytes)")
        with hub._lock:
            hub._repo(repo_type, repo_id).lfs[oid] = data
        return self._send(200, b"", "", {"ETag": f'"{hashlib.md5(data).hexdigest()}"'})


def _split_revision(segs: list[str], whole: bool = False) -> tuple[str, list[str]]:
    """Revision and the rest of a path. Revisions arrive percent-encoded as one segment, except the special
    refs (``refs/pr/N``, ``refs/convert/X``) that some clients leave unencoded."""
    if len(segs) >= 3 and segs[0] == "refs" and segs[1] in ("pr", "convert"):
        rev, rest = "/".join(segs[:3]), segs[3:]
    else:
        rev, rest = segs[0], segs[1:]
    if whole and rest:
        rev, rest = "/".join([rev, *rest]), []
    return rev, rest


def _last_commit(repo: Repo, c: Commit, path: str) -> Commit:
    """The newest commit, from ``c`` back, that changed ``path`` (a file, or anything below a folder)."""

    def snapshot(commit: Commit):
        if path in commit.files:
            return commit.files[path].oid
        return tuple(sorted((p, b.oid) for p, b in commit.files.items() if p.startswith(path + "/")))

    current = c
    while current.parent is not None:
        parent = repo.commits[current.parent]
        if snapshot(parent) != snapshot(current):
            return current
        current = parent
    return current


def _json_or_none(blob: Blob | None):
    if blob is None:
        return None
    try:
        return json.loads(blob.data)
    except ValueError:
        return None


def _card_data(blob: Blob | None) -> dict | None:
    """The YAML front matter of a README.md, as the hub returns it in ``cardData``."""
    if blob is None:
        return None
    m = re.match(rb"^---\s*\n(.*?)\n---\s*(\n|$)", blob.data, re.S)
    if not m:
        return None
    try:
        import yaml

        data = yaml.safe_load(m.group(1))
    except Exception:
        return None
    return data if isinstance(data, dict) else None


def start(sock: socket.socket | None = None) -> HubServer:
    """A running fake hub on ``sock`` (a bound socket, e.g. from :func:`reserve_port`) or a free port."""
    server = HubServer(sock)
    server._serve()
    return server


def go_online(server: HubServer, monkeypatch, cache_dir: Path) -> HubServer:
    """Make ``server`` reachable for one test, in-process and for subprocesses (see the module docstring)."""
    import datasets.config
    import huggingface_hub.constants as hf_constants

    if hf_constants.ENDPOINT != server.endpoint or datasets.config.HF_ENDPOINT != server.endpoint:
        raise RuntimeError(
            f"huggingface_hub/datasets were imported before tests/conftest.py exported HF_ENDPOINT "
            f"({hf_constants.ENDPOINT} != {server.endpoint}); import them lazily in tests"
        )
    if not server.running:
        server.restart()
    server.clear_faults()
    server.clear_requests()
    server.page_size, server.lfs_chunk_size = DEFAULT_PAGE_SIZE, DEFAULT_LFS_CHUNK_SIZE
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    return server


if __name__ == "__main__":  # a standalone hub to poke at by hand
    srv = start()
    print(f"HF_ENDPOINT={srv.endpoint} HF_TOKEN={srv.token} HF_HUB_DISABLE_XET=1", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.close()
