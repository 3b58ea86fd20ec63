"""`extract` and `hooks`: bad input is one line naming the problem and the fix, a non-zero exit, nothing written;
the summary links only to a server that outlives the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cliargs import extract_argv

from actcache.cli.app import main


@pytest.fixture
def argv(tiny_models, corpus, store):
    return extract_argv(tiny_models["gpt2"], corpus, store)


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag`` set to ``value`` (a value may carry further ``--flag value`` pairs)."""
    out = list(argv)
    first, *rest = [value] if value.startswith(("{", "[")) else value.split(" --")
    pairs = [(flag, first)] + [tuple(("--" + r).split(" ", 1)) for r in rest]
    for f, v in pairs:
        if f in out:
            out[out.index(f) + 1] = v
        else:
            out += [f, v]
    return out


def _files(tmp_path: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}


def _empty(tmp_path: Path) -> str:
    p = tmp_path / "empty.txt"
    p.write_text("\n\n")
    return str(p)


def _other_column(tmp_path: Path) -> str:
    p = tmp_path / "rows.jsonl"
    p.write_text("\n".join(json.dumps({"body": f"document {i}", "id": i}) for i in range(5)))
    return str(p)


def _a_file(tmp_path: Path) -> str:
    p = tmp_path / "not-a-dir"
    p.write_text("x")
    return str(p)


CASES = [
    # (flag, value or factory, expected fragment of the one-line message)
    ("--model", "/nonexistent/model-dir", "not found"),
    ("--model", "no-such-org/no-such-model", "not found"),
    ("--model", "builtin:tiny-bert", "unknown builtin model"),
    ("--hook", "blocks.1.hook_resid_pots", "did you mean blocks.1.hook_resid_post"),
    ("--hook", "blocks.9.hook_resid_post", "out of range"),
    ("--hook", "blocks.0.attn.hook_pattern", "not one vector per token"),
    ("--context-size", "4096 --max-tokens 8192 --shard-tokens 8192", "above the maximum of 128"),
    ("--dataset", "/nonexistent/corpus.txt", "not found"),
    ("--dataset", _empty, "is empty"),
    ("--dataset", _other_column, "its columns are ['body', 'id']"),
    ("--max-tokens", "10", "below one context"),
    ("--max-tokens", "lots", "invalid int value"),
    ("--shard-bytes", "4096 --shard-tokens 0", "--shard-bytes must be at least 1 MiB"),
    ("--batch-size", "-1", "--batch-size must be at least 1 (or 0: automatic)"),
    ("--dtype", "float8", "unsupported --dtype 'float8'; choose one of float32, float16, bfloat16"),
    ("--codec", "lz4", "unsupported --codec 'lz4'"),
    ("--store", "/sys/actcache-store", "not writable"),
    ("--store", "/proc/nope", "'/proc/nope' (--store): '/proc', the nearest folder of it that exists, takes no new"),
    ("--store", _a_file, "is a file"),
    ("--storage-options", "{endpoint_url: x}", "--storage-options is not valid JSON"),
    ("--storage-options", "[1, 2]", "must be a JSON object"),
]


@pytest.mark.parametrize("flag,value,expected", CASES, ids=[f"{c[0]}={getattr(c[1], '__name__', c[1])}" for c in CASES])
def test_bad_input_gives_one_line_and_writes_nothing(argv, tmp_path, capsys, flag, value, expected):
    value = value(tmp_path) if callable(value) else value
    before = _files(tmp_path)
    code = main(_set(argv, flag, value))
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert err.startswith("actcache: error: ") and expected in err, err
    assert _files(tmp_path) == before, "bad input must leave the filesystem as it was"
    assert not (tmp_path / "store").exists()


@pytest.mark.subprocess
def test_real_process_exits_non_zero_without_traceback(argv, store):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "actcache.cli.app", *_set(argv, "--hook", "blocks.1.hook_mlp_outt")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("actcache: error: unknown hook 'blocks.1.hook_mlp_outt'")
    assert "blocks.1.hook_mlp_out" in proc.stderr
    assert not store.exists()


def test_hooks_lists_valid_names(tiny_models, capsys):
    assert main(["hooks", str(tiny_models["llama"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    shapes = {line.split(maxsplit=1)[0]: line.split(maxsplit=1)[1] for line in lines}
    assert shapes["blocks.2.hook_resid_post"] == "[32]"
    assert shapes["blocks.0.attn.hook_z"] == "[4, 8]"  # heads x d_head, what --heads selects from
    assert shapes["blocks.0.attn.hook_k"] == "[2, 8]"  # grouped-query attention: 2 key/value heads
    assert "not one vector per token" in shapes["blocks.0.attn.hook_pattern"]


def test_hooks_json_gives_each_hooks_shape_or_why_not(tiny_models, capsys):
    """The per-token hooks with their shapes (what --hook, --heads and --dims take), and the others with why they
    cannot be extracted; every name once, in the order of the plain listing."""
    assert main(["hooks", str(tiny_models["llama"])]) == 0
    plain = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert main(["hooks", "--json", str(tiny_models["llama"])]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"] == str(tiny_models["llama"])
    shapes = {h["name"]: h["shape"] for h in doc["hooks"]}
    assert shapes["blocks.2.hook_resid_post"] == [32] and shapes["blocks.0.attn.hook_z"] == [4, 8]
    why = {h["name"]: h["why"] for h in doc["not_per_token"]}
    assert "not one vector per token" in why["blocks.0.attn.hook_pattern"]
    assert sorted([*shapes, *why]) == sorted(plain) and not set(shapes) & set(why)


def test_the_summary_links_the_run_on_a_server_that_outlives_the_command(argv, prefect_console, prefect_harness):
    """With PREFECT_API_URL set (the test session's server), the summary links the run in its UI; Prefect's own
    per-task lines stay off the console (the server keeps them; --verbose shows them)."""
    import re

    assert main(argv) == 0
    out, err = prefect_console.readouterr()
    assert re.search(r"\n  run  http://127\.0\.0\.1:\d+/runs/flow-run/[0-9a-f-]{36}\n", err), err
    assert "runs are not kept" not in err and "Task run" not in err and "Finished in state" not in err, err
    assert "4 shards computed, 0 already stored; 512 tokens in 4 shards" in err, err
    url = out.strip().splitlines()[-1]
    assert f"  set  {url}" in err and f"actcache show {url}" in err

    assert main(["--verbose", *_set(argv, "--max-tokens", "640")]) == 0  # one more shard, with Prefect's lines
    err = prefect_console.readouterr().err
    assert "Task run 'extract-000004' - Finished in state Completed" in err, err
