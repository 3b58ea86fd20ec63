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


_SLOW_SHARDS = """
import sys, time
from actcache.sets import diff
from actcache.storage.store import Store

read_bytes, shard_diff = Store.read_bytes, diff.ShardDiff


def slow_read(self, rel, **kw):  # a big shard on a slow disk: verify hashes it for 2 s
    if "/shards/" in rel:
        time.sleep(2)
    return read_bytes(self, rel, **kw)


def slow_diff(*args):  # a big pair of shards: diff compares it for 2 s
    time.sleep(2)
    return shard_diff(*args)


Store.read_bytes, diff.ShardDiff = slow_read, slow_diff
from actcache.cli.app import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("command", ["verify", "diff"])
def test_verify_and_diff_on_a_terminal_are_never_silent_for_more_than_5_s(command, extracted_set):
    """verify and diff on a set whose 4 shards take 2 s each (injected: 8 s in all, and one shard could take
    minutes on a real set): a bar with its total, redrawn while a shard takes long; no gap over 5 s."""
    argv = [sys.executable, "-c", _SLOW_SHARDS, command, extracted_set] + ([extracted_set] if command == "diff" else [])
    code, chunks = _pty_run(argv, _env(), timeout=120)
    out = b"".join(c for _, c in chunks).decode("utf-8", "replace")
    assert code == 0, out[-3000:]
    gaps = [b[0] - a[0] for a, b in zip(chunks, chunks[1:], strict=False)]
    assert chunks[-1][0] - chunks[0][0] >= 8 and max(gaps) <= 5.0, (max(gaps), out[-3000:])
    assert f"{command}: 100%" in out and "4/4 [" in out, out[-3000:]  # the bar, with its total
    assert ("OK: 4 shards" if command == "verify" else "same: 4 shards compared") in out, out[-3000:]
