"""Bad input: one line naming the problem and the fix, a non-zero exit, and nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from actcache.cli import main


@pytest.fixture
def argv(tiny_models, corpus, store):
    return ["extract", "--model", str(tiny_models["gpt2"]), "--dataset", str(corpus), "--store", str(store),
            "--context-size", "32", "--max-tokens", "512", "--shard-tokens", "128", "--device", "cpu"]


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
    ("--store", _a_file, "is a file"),
    ("--storage-options", "{endpoint_url: x}", "--storage-options is not valid JSON"),
    ("--storage-options", "[1, 2]", "must be a JSON object"),
]


@pytest.mark.parametrize("flag,value,expected", CASES, ids=[f"{c[0]}={getattr(c[1], '__name__', c[1])}"
                                                             for c in CASES])
def test_bad_input_gives_one_line_and_writes_nothing(argv, tmp_path, capsys, flag, value, expected):
    value = value(tmp_path) if callable(value) else value
    before = _files(tmp_path)
    with pytest.raises(SystemExit) if "int value" in expected else _nullcontext() as exc:
        code = main(_set(argv, flag, value))
    code = exc.value.code if exc is not None and hasattr(exc, "value") else code
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert err.startswith("actcache: error: ") and expected in err, err
    assert _files(tmp_path) == before, "bad input must leave the filesystem as it was"
    assert not (tmp_path / "store").exists()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_real_process_exits_non_zero_without_traceback(argv, store):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "actcache.cli", *_set(argv, "--hook", "blocks.1.hook_mlp_outt")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("actcache: error: unknown hook 'blocks.1.hook_mlp_outt'")
    assert "blocks.1.hook_mlp_out" in proc.stderr
    assert not store.exists()


def test_hooks_lists_valid_names(tiny_models, capsys):
    assert main(["hooks", str(tiny_models["llama"])]) == 0
    names = capsys.readouterr().out.split()
    assert "blocks.2.hook_resid_post" in names and "blocks.0.attn.hook_z" in names


@pytest.mark.usefixtures("prefect_harness")
def test_verify_fails_on_an_incomplete_set_and_says_how_many_shards_are_missing(base_config, capsys):
    from flows.extract import extract_activations

    [url] = extract_activations(base_config, partition_index=1, num_partitions=2)  # shards 1 and 3 of 4
    assert main(["verify", url]) == 1
    err = capsys.readouterr().err
    assert "incomplete: 2 of 4 shards missing (indices 0, 2)" in err and ", 2 of 4 shards missing;" in err
    extract_activations(base_config)
    assert main(["verify", url]) == 0 and "OK: 4 shards" in capsys.readouterr().out
