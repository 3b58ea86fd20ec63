"""`cp`, `shuffle`, `export`: `--json`, progress with totals, and the error as the last line of stderr."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from actcache.cli.app import main


# -- a shuffled copy (the "rows" layout) where commands expect an extracted set -----------------------------
@pytest.fixture(scope="module")
def shuffled(extracted_set, tmp_path_factory) -> dict:
    """A copy of the shared set's store (set and token cache) with a shuffled copy of the set beside."""
    import shutil

    from actcache.sets.shuffle import shuffle_set

    store = tmp_path_factory.mktemp("rows") / "store"
    shutil.copytree(Path(extracted_set).parent, store)
    source = str(store / Path(extracted_set).name)
    return {"store": store, "source": source, "rows": shuffle_set(source, seed=3).url}


def test_a_shuffled_copy_is_described_and_refused_where_it_cannot_serve(shuffled, tmp_path, capsys):
    rows, source = shuffled["rows"], shuffled["source"]
    source_id = source.rsplit("/", 1)[1]
    assert main(["show", rows]) == 0
    text = dict(line.split(None, 1) for line in capsys.readouterr().out.strip().splitlines())
    assert text["rows"].startswith(f"448 in 4 shards of up to 128, shuffled copy of {source_id} (seed 3, 0 rows")
    assert main(["show", rows, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["url"], shown["layout"], shown["seed"]) == (rows, "rows", 3)

    assert main(["ls", str(shuffled["store"]), "--json"]) == 0
    listed = {s["url"]: s for s in json.loads(capsys.readouterr().out)["sets"]}
    assert (listed[rows]["layout"], listed[rows]["state"], listed[rows]["tokens_id"]) == ("rows", "complete", None)
    assert listed[source]["layout"] is None and listed[source]["tokens_id"]

    for argv, expected in (
        (["diff", source, rows], "is a shuffled copy (rows); diff compares extracted sets"),
        (
            ["extract", "--like", rows, "--store", str(tmp_path / "s")],
            f"is a shuffled copy; reproduce its source ({source_id}) with --like",
        ),
    ):
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "s").exists()

    # the source's token cache is kept while the source exists; the shuffled copy needs none
    assert main(["gc", str(shuffled["store"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["items"] == []
    assert main(["rm", source, "--yes"]) == 0
    capsys.readouterr()
    assert main(["gc", str(shuffled["store"]), "--json", "--older-than", "0"]) == 0  # no extraction may be using it
    garbage = json.loads(capsys.readouterr().out)["items"]
    assert [(g["kind"], g["url"]) for g in garbage] == [
        ("token-cache", f"{shuffled['store']}/_tokens/{listed[source]['tokens_id']}")
    ]
    assert main(["verify", rows]) == 0  # the shuffled copy stands alone


def test_commands_that_write_take_json(extracted_set, tmp_path, capsys):
    """cp, shuffle and export print one JSON document on stdout with --json (push: tests/actcache/sets)."""
    assert main(["cp", extracted_set, str(tmp_path / "copy"), "--json"]) == 0
    copied = json.loads(capsys.readouterr().out)
    assert copied["url"] == str(tmp_path / "copy" / Path(extracted_set).name) and copied["copied"] == 4
    assert main(["shuffle", copied["url"], "--seed", "2", "--json"]) == 0
    shuffled = json.loads(capsys.readouterr().out)
    assert shuffled["rows"] == 448 and shuffled["shards"] == 4 and not shuffled["skipped"]
    assert main(["export", shuffled["url"], str(tmp_path / "hf"), "--format", "hf", "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported == {"path": str(tmp_path / "hf"), "rows": 448, "excluded_tokens": 0, "dtype": "float16"}


@pytest.mark.subprocess
def test_no_progress_bar_before_an_error(extracted_set, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}  # bars on (tqdm reads it at import)
    (tmp_path / "taken").mkdir()
    for argv in (
        ["export", extracted_set, str(tmp_path / "taken"), "--format", "hf"],
        ["shuffle", str(tmp_path / ("0" * 24))],
        ["cp", str(tmp_path / ("0" * 24)), str(tmp_path / "copy")],
    ):
        run = subprocess.run(
            [sys.executable, "-m", "actcache.cli", *argv], capture_output=True, text=True, env=env, timeout=120
        )
        assert run.returncode == 2
        assert run.stderr.count("\n") == 1 and run.stderr.startswith("actcache: error:"), (argv, run.stderr)


@pytest.mark.subprocess
@pytest.mark.parametrize("command", ["cp", "export", "shuffle"])
def test_the_error_is_the_last_line_of_stderr_after_a_progress_bar(extracted_set, tmp_path, command):
    """A command that fails midway on a terminal: its progress bar is closed before the error line, which is the
    last line (stderr is a pseudo-terminal here, so the bar is drawn as for a user)."""
    import fcntl
    import pty
    import shutil
    import struct
    import termios
    import threading

    store = shutil.copytree(Path(extracted_set).parent, tmp_path / "store")
    url = f"{store}/{Path(extracted_set).name}"
    shard = Path(url) / "shards" / "000002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # same size and mtime order: found only when the shard is read
    shard.write_bytes(bytes(data))
    argv = {
        "cp": ["cp", url, str(tmp_path / "copy")],
        "export": ["export", url, str(tmp_path / "export"), "--format", "hf"],
        "shuffle": ["shuffle", url, "--out", str(tmp_path / "shuffled")],
    }[command]
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}  # bars on, as for a user
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 0 columns: an empty bar
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: every writer closed the terminal
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        run = subprocess.run(
            [sys.executable, "-m", "actcache.cli", *argv], stdout=subprocess.PIPE, stderr=follower, timeout=300, env=env
        )
    finally:
        os.close(follower)
        reader.join(10)
        os.close(leader)
    stderr = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
    lines = stderr.strip().split("\n")
    assert re.search(r"\| \d+/\d+ \[", stderr), "a progress bar was drawn: " + stderr
    assert run.returncode != 0 and lines[-1].startswith("actcache: error: ") and "shard 2" in lines[-1], stderr


def test_cp_and_export_count_to_their_totals_off_a_terminal(extracted_set, tmp_path, capsys):
    """Off a terminal (no bar), a command's progress is a line with its total; stats already in the manifest
    read no shard and print no progress."""
    assert main(["cp", extracted_set, str(tmp_path / "copy")]) == 0
    err = capsys.readouterr().err
    assert "cp: 4/4 shards" in err and "\r" not in err, err
    assert main(["export", extracted_set, str(tmp_path / "hf"), "--format", "hf"]) == 0
    err = capsys.readouterr().err
    assert "export: 4/4 shards" in err and "Saving the dataset" not in err, err
    assert main(["stats", extracted_set]) == 0
    assert "stats:" not in capsys.readouterr().err
    for argv, line in (
        (["verify", extracted_set], "verify: 4/4 shards"),
        (["diff", extracted_set, extracted_set], "diff: 4/4"),
    ):
        assert main(argv) == 0
        err = capsys.readouterr().err
        assert line in err and "\r" not in err, err
    # No bar before an error: a set that is not there fails with its one line alone.
    assert main(["verify", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("actcache: error: ") and "verify:" not in err and err.count("\n") == 1, err
