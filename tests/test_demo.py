"""The README's first command, as CI runs it: `make demo`, twice; and what a person at a terminal sees."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.prefect, pytest.mark.subprocess]  # `actcache extract` in a process of its own

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("actcache"))


def _env(**extra: str) -> dict[str, str]:
    # As a newcomer runs it: no Prefect API configured (a temporary server), no --verbose.
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "TQDM_DISABLE")}
    return {**env, **extra}


def _demo(store: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-s", "-C", str(ROOT), "demo", f"DEMO_STORE={store}"],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )


def _quiet(err: str) -> None:
    """Only actcache's own lines: no Prefect run logs, no link to a server gone with the command, no other bars."""
    for noise in ("INFO", "Task run", "Flow run", "View at", "Writing model shards", "\r"):
        assert noise not in err, (noise, err[-3000:])


def test_make_demo_twice_second_run_skips_every_shard(tmp_path):
    store = tmp_path / "activations"
    first = _demo(store)
    assert first.returncode == 0, first.stderr[-3000:]
    lines = first.stdout.strip().splitlines()
    set_url = next(line for line in lines if line.startswith(str(store)))
    assert "blocks.1.hook_resid_post" in first.stdout and "complete" in first.stdout  # the `ls` table
    assert len(list(Path(set_url).glob("shards/*.safetensors"))) == 4
    # One plain summary: what was computed, how much, where it is, how runs are kept, what to try next.
    _quiet(first.stderr)
    assert "blocks.1.hook_resid_post: 4 shards computed, 0 already stored; 32768 tokens in 4 shards" in first.stderr
    assert "tokens/s" in first.stderr and f"  set  {set_url}" in first.stderr
    assert "extract: 4/4 shards, " in first.stderr  # off a terminal: a progress line (every 10 s, and the last)
    assert "prefect server start" in first.stderr and "PREFECT_API_URL" in first.stderr
    assert f"actcache show {set_url}" in first.stderr and f"actcache.open_set('{set_url}')" in first.stderr
    # those `next:` lines need the venv, which `make` does not activate for the user's shell: it says how
    assert first.stderr.rstrip().endswith("run `source .venv/bin/activate` for the commands above)"), first.stderr
    stamps = {
        p: (p.stat().st_mtime_ns, p.read_bytes()) for p in store.rglob("*") if p.is_file() and p.name != "manifest.json"
    }

    second = _demo(store)
    assert second.returncode == 0, second.stderr[-3000:]
    _quiet(second.stderr)
    assert "0 shards computed, 4 already stored; 32768 tokens in 4 shards" in second.stderr
    assert "runs are not kept" not in second.stderr  # no flow ran
    # Nothing was computed again: every shard, record and token file is the very file the first run wrote.
    assert {
        p: (p.stat().st_mtime_ns, p.read_bytes()) for p in store.rglob("*") if p.is_file() and p.name != "manifest.json"
    } == stamps

    # The summary's Python line runs as printed.
    line = next(x for x in second.stderr.splitlines() if x.strip().startswith("python -c"))
    code = line.split('"')[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split() == ["32768", "64"], out.stderr[-2000:]


def _pty_run(argv: list[str], env: dict[str, str], timeout: float = 600) -> tuple[int, list[tuple[float, bytes]]]:
    """Run ``argv`` on a pseudo-terminal (80 columns); every chunk of output with the time it arrived."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child: a terminal of a real size (tqdm draws nothing 0 columns wide)
        try:
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    chunks: list[tuple[float, bytes]] = []
    start = time.monotonic()
    try:
        while time.monotonic() - start < timeout:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                continue
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append((time.monotonic(), data))
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), chunks


@pytest.mark.slow
def test_on_a_terminal_nothing_is_silent_for_more_than_5_s(tmp_path):
    """The demo extraction on a pseudo-terminal: a status line while libraries, the model and Prefect start, a
    bar with its total while shards are computed, the summary; no gap over 5 s after the first line. (The rule
    leaves room: the status line is redrawn every second, the bar too.)"""
    argv = [CLI, "extract", "--max-tokens", "32768", "--shard-tokens", "8192", "--store", str(tmp_path / "s")]
    code, chunks = _pty_run(argv, _env())
    out = b"".join(c for _, c in chunks).decode("utf-8", "replace")
    assert code == 0, out[-3000:]
    gaps = [b[0] - a[0] for a, b in zip(chunks, chunks[1:], strict=False)]
    assert chunks and max(gaps, default=0) <= 5.0, (max(gaps), out[-3000:])
    assert "loading builtin:tiny-gpt2" in out and "starting" in out  # the status lines
    assert "32.8k/32.8k" in out and "4/4 shards stored" in out  # the bar, with totals
    assert "4 shards computed, 0 already stored" in out
    for noise in ("INFO", "View at", "Writing model shards"):
        assert noise not in out, noise


_SLOWED = """
import importlib, json, os, sys, time

for target, seconds, only in json.loads(os.environ["ACTCACHE_TEST_SLOW"]):  # "module:attr.attr", s, substring
    module, _, attr = target.partition(":")
    *path, name = attr.split(".")
    owner = importlib.import_module(module)
    for part in path:
        owner = getattr(owner, part)

    def slow(*args, _call=getattr(owner, name), _s=seconds, _only=only, **kwargs):
        if _only is None or any(_only in str(a) for a in args):
            time.sleep(_s)
        return _call(*args, **kwargs)

    setattr(owner, name, slow)
print("(started)", file=sys.stderr, flush=True)  # gaps count from here, the injected waits included
from actcache.cli.app import main

sys.exit(main(sys.argv[1:]))
"""

_SHARD_READS = ("actcache.storage.store:Store.read_bytes", 2, "/shards/")  # a big shard on a slow disk: 2 s
_OPEN = ("actcache.cli.parser:StoreFlags.open_set", 6, None)  # a set on S3 opened and listed (s3fs imported)

# command: (argv after the command, injected waits, the least time it takes, what the terminal must show).
# A wait of 6 s where no bar can run yet (a store listed, a model loaded) needs a status line; 2-3 s per step
# under a bar needs the bar redrawn while a step takes long. SET is a set, COPY a copy of it in STORE, TMP a new folder.
LONG_COMMANDS = {
    "verify": (["SET"], [_OPEN, _SHARD_READS], 14, ["reading", "verify: 100%", "4/4 [", "OK: 4 shards"]),
    "diff": (
        ["SET", "SET"],
        [_OPEN, ("actcache.sets.diff:ShardDiff", 2, None)],
        20,
        ["reading", "diff: 100%", "4/4 [", "same: 4"],
    ),
    "cp": (
        ["SET", "TMP", "--jobs", "1"],
        [("actcache.sets.copy:open_set", 6, None), _SHARD_READS],
        14,
        ["comparing", "cp: 100%", "4/4 [", "copied 4 shards"],
    ),
    "push": (
        ["SET", "REPO"],
        [("actcache.sets.push:_files", 6, None), ("huggingface_hub:HfApi.create_commit", 3, None)],
        12,
        ["comparing", "push: 100%", "10/10 [", "uploaded 10 files"],
    ),
    "rm": (
        ["COPY", "--yes"],
        [("actcache.sets.cleanup:find_set", 6, None), ("actcache.sets.cleanup:remove_set", 6, None)],
        12,
        ["listing", "removing", "removed"],
    ),
    "stats": (["SET"], [("actcache.sets.stats:compute", 6, None)], 6, ["reading", "rows: 448"]),
    "shuffle": (
        ["SET", "--out", "TMP"],
        [("actcache.sets.shuffle:shuffle_set", 6, None)],
        6,
        ["reading", "shuffle: 100%", "written: 448 rows"],
    ),
    "export": (
        ["SET", "TMP", "--format", "hf"],
        [("actcache.sets.export:export_set", 6, None)],
        6,
        ["reading", "export: 100%", "4/4 [", "448 rows"],
    ),
    "gc": (["STORE"], [("actcache.sets.cleanup:find_garbage", 6, None)], 6, ["looking for what no set needs"]),
    # a first probe loads the model (and torch): ACTCACHE_CACHE_DIR is empty, so nothing is remembered
    "hooks": (["MODEL"], [("actcache.inputs.hooks:_probe_catalog", 4, None)], 4, ["to list its hooks", "hook_"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("command", list(LONG_COMMANDS))
def test_long_commands_on_a_terminal_are_never_silent_for_more_than_5_s(command, extracted_set, tmp_path, request):
    """Each command that can take long, made slow where it waits (a listing, a model load: a status line; shards,
    commits: a bar with its total, redrawn while one takes long): no gap over 5 s on a pseudo-terminal."""
    import json
    import shutil

    args, slow, least_s, shown = LONG_COMMANDS[command]
    names = {"SET": extracted_set, "TMP": str(tmp_path / "dest")}
    if "COPY" in args or "STORE" in args:
        names["STORE"] = str(tmp_path / "store")
        names["COPY"] = shutil.copytree(extracted_set, tmp_path / "store" / Path(extracted_set).name)
    if "REPO" in args:
        names["REPO"] = request.getfixturevalue("hub").new_repo_id("pty")  # (it exports the fake hub's HF_*)
    if "MODEL" in args:
        names["MODEL"] = str(request.getfixturevalue("tiny_models")["gpt2"])
    env = _env(ACTCACHE_TEST_SLOW=json.dumps(slow), ACTCACHE_CACHE_DIR=str(tmp_path / "cache"))
    argv = [sys.executable, "-c", _SLOWED, command, *(str(names.get(a, a)) for a in args)]
    code, chunks = _pty_run(argv, env, timeout=180)
    out = b"".join(c for _, c in chunks).decode("utf-8", "replace")
    assert code == 0, out[-3000:]
    start = next(i for i, (_, c) in enumerate(chunks) if b"(started)" in c)
    times = [t for t, _ in chunks[start:]]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert times[-1] - times[0] >= least_s and max(gaps) <= 5.0, (max(gaps), out[-3000:])
    for text in shown:
        assert text in out, (text, out[-3000:])


@pytest.mark.slow
@pytest.mark.parametrize("command", ["verify", "diff"])
def test_verify_and_diff_on_slow_s3_show_their_status_line_before_waiting(command, extracted_set, s3_env, tmp_path):
    """A set on S3 behind a proxy that holds every request (tests/s3_server.py SlowProxy, loopback): on a
    pseudo-terminal the status line is drawn before the first answer comes back (not once the set is opened), and
    nothing is silent for more than 5 s while the set is opened, listed and read. (diff of a set with itself
    reads its manifest twice and no shard: each request is held 3 s, so that opening alone takes 6 s.)"""

    from s3_server import BUCKET, SlowProxy

    from actcache.cli.app import main

    url = f"s3://{BUCKET}/{tmp_path.name}"
    assert main(["cp", extracted_set, url]) == 0  # straight to moto
    set_url = f"{url}/{Path(extracted_set).name}"
    argv = [CLI, command, set_url, *([set_url] if command == "diff" else [])]
    with SlowProxy(s3_env["AWS_ENDPOINT_URL"], delay_s=1.5 if command == "verify" else 3.0) as proxy:
        code, chunks = _pty_run(argv, _env(**{**s3_env, "AWS_ENDPOINT_URL": proxy.endpoint}), timeout=240)
    out = b"".join(c for _, c in chunks).decode("utf-8", "replace")
    assert code == 0, out[-3000:]
    assert proxy.requests >= (6 if command == "verify" else 2), proxy.lines  # it went through the slow store
    shown = next((t for t, c in chunks if b"reading s3://" in c), None)
    assert shown is not None and chunks[0][0] == shown, out[:500]  # the status line is the first thing shown
    assert shown < proxy.first_answer, (shown, proxy.first_answer)
    times = [t for t, _ in chunks]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert times[-1] - shown >= 5.5 and max(gaps) <= 5.0, (max(gaps), out[-3000:])
    for text in (f"{command}: 100%", "4/4 [", "OK: 4 shards" if command == "verify" else "same: 4"):
        assert text in out, (text, out[-3000:])
