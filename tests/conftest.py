"""Shared fixtures: tiny random-weight models built locally, a local corpus, one Prefect harness."""

from __future__ import annotations

import os
import socket
import tempfile

# Before anything imports prefect or huggingface_hub: isolate state and never touch the network.
_SESSION_TMP = tempfile.mkdtemp(prefix="actcache-tests-")
# A pytest-xdist worker (`make test` runs two) inherits the controller's environment, this line's value included:
# it takes a home of its own, as it takes its own temporary folder, cache and hub port below.
if "PYTEST_XDIST_WORKER" in os.environ or "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = os.path.join(_SESSION_TMP, "prefect")
os.environ["ACTCACHE_CACHE_DIR"] = os.path.join(_SESSION_TMP, "cache")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("TQDM_DISABLE", "1")
# The fake HF hub (tests/hub_server.py): huggingface_hub and datasets read these at import, so the session
# hub's port is reserved (bound, not listening: refused until a test asks for `hub`) and exported now. A
# private HF_HOME keeps the user's caches and saved token out of tests; the hub speaks no Xet.
_HUB_SOCKET = socket.socket()
_HUB_SOCKET.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
_HUB_SOCKET.bind(("127.0.0.1", 0))
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{_HUB_SOCKET.getsockname()[1]}"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HOME"] = os.path.join(_SESSION_TMP, "hf-home")
for _k in (
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_DATASETS_CACHE",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
):
    os.environ.pop(_k, None)

import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Before tests/ goes on sys.path: tests/actcache (the mirror of the package, no __init__.py) would otherwise be
# taken for a namespace package `actcache` under a bare `pytest`, which has no checkout on sys.path.
from actcache.inputs import demo, fingerprint  # noqa: E402

# Shared test helpers (setwriter, setfiles, modelcache, s3_server, hub_server, prefect_server) import by name.
sys.path.insert(0, str(Path(__file__).parent))

# What a test needs beyond this process, as markers (registered in pyproject.toml; `make test-fast` runs the tests
# that need none of them). Most are given here from the fixtures a test uses (item.fixturenames holds every fixture
# it reaches, through other fixtures too) and from its folder; a test that starts programs itself says so with
# @pytest.mark.subprocess, and `_spawn_guard` below fails an unmarked test that starts one.
NEEDS_BY_FIXTURE = {
    "prefect": ("prefect_harness", "prefect_server"),
    "s3": ("s3_server", "restartable_s3"),
    "hub": ("hub_server",),
    "deployment": ("prefect_server",),
}
# Whole processes killed, deployments on a real server, S3 endpoints killed, the demo twice, the benchmark and
# the infra images: `make test` (CI) runs them, `make test-fast` does not.
SLOW = (
    "flows/test_crash.py",
    "flows/test_s3_faults.py",
    "flows/test_lost_api.py",
    "deployments/",
    "test_demo.py",
    "bench/",
    "infra/",
)
NEEDS_BY_PATH = {"deployment": ("deployments/",), "slow": SLOW}
NEEDS = ("prefect", "subprocess", "s3", "hub", "deployment", "slow")
# Per-test timeouts (pytest-timeout; the default, 600 s, is in pyproject.toml): a unit test that hangs fails
# in minutes; tests that start servers or kill processes get longer. An explicit @pytest.mark.timeout wins.
UNIT_TIMEOUT_S = 300
SLOW_TIMEOUT_S = 1800


def pytest_collection_modifyitems(items) -> None:
    root = Path(__file__).parent
    for item in items:
        rel = Path(str(item.fspath)).relative_to(root).as_posix()
        for name, fixtures in NEEDS_BY_FIXTURE.items():
            if any(f in item.fixturenames for f in fixtures):
                item.add_marker(name)
        for name, prefixes in NEEDS_BY_PATH.items():
            if rel.startswith(prefixes):
                item.add_marker(name)
        if item.get_closest_marker("timeout") is None:
            if item.get_closest_marker("slow") or item.get_closest_marker("deployment"):
                item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
            elif not any(item.get_closest_marker(m) for m in NEEDS):
                item.add_marker(pytest.mark.timeout(UNIT_TIMEOUT_S))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        _long_files_first(items)


def _long_files_first(items) -> None:
    """Under pytest-xdist (`make test`: `--dist loadfile --no-loadscope-reorder`, whole files dealt to the workers in
    this order as they free up), the files that take minutes go first: the deployment and slow ones, then those with
    servers or processes, then the unit tier. The last files dealt are short ones, and no worker waits alone at the
    end for a long file. Within a file, and among files of one rank, the order stays as collected."""

    def rank(item) -> int:
        if item.get_closest_marker("slow") or item.get_closest_marker("deployment"):
            return 0
        return 1 if any(item.get_closest_marker(m) for m in NEEDS) else 2

    by_file: dict[str, int] = {}
    for item in items:
        by_file[item.nodeid.split("::")[0]] = min(rank(item), by_file.get(item.nodeid.split("::")[0], 2))
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (by_file[item.nodeid.split("::")[0]], order[id(item)]))


# Programs started by a test of the unit tier (no marker from NEEDS), seen through Python's audit events: such a
# test would slip into `make test-fast` with a process it does not declare. (Forks of this process, e.g. data
# loader workers, are not programs started and are not counted.)
_SPAWN_EVENTS = frozenset({"subprocess.Popen", "os.posix_spawn", "os.system", "os.exec", "os.spawn"})
_spawn_guard = {"on": False, "seen": []}


def _audit(event: str, args: tuple) -> None:
    if _spawn_guard["on"] and event in _SPAWN_EVENTS:
        _spawn_guard["seen"].append(f"{event} {str(args[:2])[:200]}")


sys.addaudithook(_audit)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    _spawn_guard["seen"] = []
    _spawn_guard["on"] = not any(item.get_closest_marker(m) for m in NEEDS)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    try:
        result = yield
    finally:
        _spawn_guard["on"] = False
    if _spawn_guard["seen"]:
        pytest.fail(
            f"this test starts programs ({'; '.join(_spawn_guard['seen'][:3])}) but has no marker that says so: "
            "mark it @pytest.mark.subprocess (or use the fixture that starts the server)",
            pytrace=False,
        )
    return result


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return Path(_SESSION_TMP)


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """Random-weight GPT-2, Llama and GPT-NeoX models with a trained BPE tokenizer (save_pretrained), built once
    per machine (tests/modelcache.py). Read them; copy one before changing it."""
    from modelcache import tiny_model

    return {arch: tiny_model(arch, layers=3, d=32, ctx=128) for arch in ("gpt2", "llama", "neox")}


@pytest.fixture(scope="session", autouse=True)
def demo_model() -> Path:
    """``builtin:tiny-gpt2`` (the default model) in this session's cache, copied from the machine's model cache
    instead of built: its place is where ``actcache.inputs.demo.builtin_model`` looks, its bytes what it builds."""
    from modelcache import tiny_model

    out = fingerprint.cache_dir() / "builtin" / f"tiny-gpt2-{demo._VERSION}"
    if not out.exists():
        shutil.copytree(tiny_model("gpt2"), out)
    return out


@pytest.fixture(scope="session")
def corpus(session_tmp: Path) -> Path:
    """About 40k tokens of text, one document per line."""
    path = session_tmp / "corpus.txt"
    if not path.exists():
        path.write_text("\n".join(demo.corpus_lines()[:1500]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session (entering it costs 15-20 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def prefect_console(prefect_harness, capfd, monkeypatch):
    """``capfd``, with Prefect's console handlers writing to this test's stderr as they would to a terminal (for
    tests that run a flow: the session's harness comes with it).

    A handler keeps the stream of whichever test configured logging, which pytest has closed since: its lines
    (and a logging error) would otherwise not be what a user sees. Every emit now writes to the current stderr.
    """
    import sys

    from prefect.logging.handlers import PrefectConsoleHandler

    emit = PrefectConsoleHandler.emit

    def emit_to_current_stderr(self, record):
        self.stream = self.console.file = sys.stderr
        emit(self, record)

    monkeypatch.setattr(PrefectConsoleHandler, "emit", emit_to_current_stderr)
    capfd.readouterr()  # drop what an earlier test's run left in a buffer: this test reads only its own lines
    return capfd


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture(scope="session")
def make_config(tiny_models, corpus):
    """The suite's one config builder: ``make_config(**overrides)`` is a small, fast extraction on the tiny
    GPT-2's blocks.1.hook_resid_post over the corpus (4 shards of 4 sequences of 32 tokens, batches of 4, CPU) with
    ``overrides`` applied; ``arch="llama"`` or ``"neox"`` picks another tiny model. The store is
    ExtractConfig's default unless given."""
    from actcache.config import ExtractConfig

    def make(*, arch: str = "gpt2", **overrides) -> ExtractConfig:
        fields = {
            "model": str(tiny_models[arch]),
            "hook": "blocks.1.hook_resid_post",
            "dataset": str(corpus),
            "context_size": 32,
            "max_tokens": 512,
            "shard_tokens": 128,
            "batch_size": 4,
            "device": "cpu",
        }
        return ExtractConfig(**(fields | overrides))

    return make


@pytest.fixture
def base_config(make_config, store):
    """``make_config()`` into this test's own ``store``."""
    return make_config(store=str(store))


# -- S3 (issue 3): a real moto_server process, reached only through its endpoint URL ---------------------
@pytest.fixture(scope="session")
def s3_server(session_tmp: Path):
    """moto_server on a free 127.0.0.1 port with a bucket and IAM auth on (see tests/s3_server.py)."""
    import s3_server as s3_module

    server = s3_module.start(session_tmp / "moto_server.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path: Path) -> dict[str, str]:
    """The writer's credentials and the endpoint in the standard AWS variables; no shared config files."""
    env = {
        **s3_server.env("writer"),
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture
def restartable_s3(tmp_path: Path):
    """A moto_server of its own that a test may kill and restart with its objects (recorded and replayed)."""
    import s3_server as s3_module

    server = s3_module.start(tmp_path / "moto_server.log", recording=tmp_path / "moto_recording.jsonl")
    try:
        yield server
    finally:
        server.stop()


# -- HF hub: a fake hub speaking the hub's HTTP API at HF_ENDPOINT (tests/hub_server.py explains the use) ---
@pytest.fixture(scope="session")
def hub_server():
    """The session's fake hub on the port reserved above; tests reach it through the `hub` fixture."""
    import hub_server as hub_module

    server = hub_module.start(_HUB_SOCKET)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def hub(hub_server, monkeypatch, tmp_path: Path):
    """The fake hub, online for this test only: in-process clients and subprocesses started with os.environ
    reach it with its write token and a per-test HF_HUB_CACHE; request log and faults start empty."""
    import hub_server as hub_module

    return hub_module.go_online(hub_server, monkeypatch, tmp_path / "hf-hub-cache")


@pytest.fixture(scope="session")
def extracted_set(make_config, session_tmp: Path) -> str:
    """One small set for tests that only read it (copy it before changing anything): 14 sequences of 32
    tokens of the tiny GPT-2's blocks.1.hook_resid_post, float16, in shards of 4, 4, 4 and 2 sequences.

    Written by the flow's own stages called in the flow's order, without Prefect (no server to start: the
    flow itself is tested in tests/flows and tests/tasks)."""
    from setwriter import extract_by_stages

    return extract_by_stages(make_config(max_tokens=448, store=str(session_tmp / "extracted-set")))


def pytest_unconfigure(config: pytest.Config) -> None:
    """The session's folder (Prefect home, caches, HF home) goes with the session: hundreds were left in /tmp."""
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)
