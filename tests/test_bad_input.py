"""The bad-input catalogue across the CLI, the Python API and deployment parameters.

Every entry: one line naming the problem and the fix, a non-zero exit (or an exception), and the store
exactly as it was. (`tests/actcache/cli/test_app.py` holds the `extract` option catalogue.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cliargs import config_argv

import actcache
from actcache.cli.app import main

# Tests that run a flow ask for the session's Prefect harness (prefect_console brings it too); the rest, e.g.
# the CLI catalogue on a set written by stages, need no Prefect.


@pytest.fixture(scope="module")
def good_set(make_config, tmp_path_factory) -> str:
    """A 2-shard set written by the flow's stages without Prefect (the CLI's refusals are what is tested)."""
    from setwriter import extract_by_stages

    return extract_by_stages(make_config(max_tokens=256, store=str(tmp_path_factory.mktemp("store"))))


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def _newer_format(url: str) -> str:
    m = json.loads((Path(url) / "manifest.json").read_text())
    m["format_version"] = 7
    (Path(url) / "manifest.json").write_text(json.dumps(m))
    return url


def _relabelled(url: str) -> str:
    m = json.loads((Path(url) / "manifest.json").read_text())
    m["key"]["dtype"] = m["dtype"] = "float32"  # claims another encoding than the shards have
    (Path(url) / "manifest.json").write_text(json.dumps(m))
    return url


def _escaping(url: str) -> str:
    m = json.loads((Path(url) / "manifest.json").read_text())
    m["shards"][0]["file"] = "../../../etc/passwd"
    (Path(url) / "manifest.json").write_text(json.dumps(m))
    return url


CLI = [
    (["show", "{set}"], _newer_format, "newer than this actcache reads"),
    (["verify", "{set}"], _relabelled, "regenerate it with `actcache extract`"),
    (["show", "{set}"], _escaping, "not a shard path"),
    (["show", "{store}/0123456789abcdef01234567"], None, "no activation set at"),
    (["verify", "{store}/../etc"], None, "is not a set id"),
    (["show", "{store}"], None, "if {store} is a store, `actcache ls {store}` lists its sets"),
    (["ls", "{store}/nowhere"], None, "does not exist"),
    (["show", "{set}", "--storage-options", "[1,"], None, "--storage-options is not valid JSON"),
    (["cp", "{set}", "/sys/actcache-copy"], None, "not writable"),
]


@pytest.mark.parametrize("argv,damage,expected", CLI, ids=[f"{a[0]}:{expected}" for a, _, expected in CLI])
def test_cli(good_set, tmp_path, capsys, argv, damage, expected):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(Path(good_set).parent, store)
    url = str(store / Path(good_set).name)
    if damage:
        damage(url)
    before = _snapshot(store)
    code = main([a.format(set=url, store=store) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    expected = expected.format(store=store)
    assert code != 0 and len(err) == 1 and err[0].startswith("actcache: error: ") and expected in err[0], err
    assert _snapshot(store) == before


API = [
    (lambda c: actcache.extract(c, hook="blocks.1.hook_rsid_post"), "did you mean blocks.1.hook_resid_post"),
    (lambda c: actcache.extract(c, max_tokens=8), "below one context"),
    (lambda c: actcache.extract(c, codec="lz4"), "choose one of none, zstd"),
    (lambda c: actcache.extract(c, storage_options={"secret": "s3cr3t"}), "credentials"),
    (lambda c: actcache.extract(c, dataset="/nonexistent/*.parquet"), "not found"),
    (lambda c: actcache.open_set(c.store + "/0123456789abcdef01234567"), "no activation set"),
]


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("call,expected", API, ids=[e for _, e in API])
def test_python_api(base_config, call, expected):
    with pytest.raises(actcache.ActcacheError) as e:
        call(base_config)
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert "s3cr3t" not in str(e.value)
    assert not Path(base_config.store).exists()


DEPLOYMENT = [
    ({"config": {"dtype": "float8"}}, "config.dtype: Input should be 'float32', 'float16' or 'bfloat16'"),
    ({"config": {"dtypo": "float16"}}, "config.dtypo: Unexpected keyword argument"),
    ({"config": {"max_tokens": 10}}, "max_tokens 10 is below one context of 128 tokens; raise max_tokens"),
    ({"config": {"storage_options": "x"}}, "config.storage_options: Input should be a valid dictionary"),
    ({"partition_index": "first"}, "partition_index: Input should be a valid integer"),
]


@pytest.mark.parametrize("params,expected", DEPLOYMENT, ids=[e for _, e in DEPLOYMENT])
def test_deployment_parameters(params, expected):
    """What the server and workers check before a run starts (the flow's typed signature)."""
    from actcache.flows.extract import extract_activations

    with pytest.raises(Exception) as e:  # noqa: B017 - pydantic's or ours, the message is the contract
        extract_activations.validate_parameters(params)
    assert expected in str(e.value)


def test_bad_partition_fails_the_run_in_one_line(base_config, prefect_console):
    from actcache.flows.extract import extract_activations

    state = extract_activations(base_config, partition_index=4, num_partitions=4, return_state=True)
    assert state.is_failed()
    with pytest.raises(actcache.ActcacheError, match="partition 4 of 4 is invalid"):
        state.result()
    assert not Path(base_config.store).exists()
    # Read here, so that this failed run's log (and its traceback) can never reach the next test's stderr.
    assert "partition 4 of 4 is invalid" in prefect_console.readouterr().err


# -- issue 12: bad input found deep inside the run: one line, exit 2, nothing written --------------------------
GOOD = [f"plain document number {i} with a few words in it" for i in range(300)]


def _jsonl(rows) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode() + b"\n"


def _parquet(values) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"text": values}), buf)
    return buf.getvalue()


def _deep_bad(row) -> bytes:
    """Good rows first (the plan's first look passes), the bad one at line 50: found only by reading on."""
    return _jsonl([{"text": t} for t in GOOD[:49]] + [row] + [{"text": t} for t in GOOD[49:]])


DATA = {  # file name -> (bytes, what the one line must say)
    "number.jsonl": (_deep_bad({"text": 5}), "line 50: column 'text' holds int"),
    "list.jsonl": (_deep_bad({"text": ["a", "b"]}), "line 50: column 'text' holds list"),
    "object.jsonl": (_deep_bad({"text": {"a": 1}}), "line 50: column 'text' holds dict"),
    "bool.jsonl": (_deep_bad({"text": True}), "line 50: column 'text' holds bool"),
    "array-row.jsonl": (_deep_bad('["not", "an", "object"]'), "line 50: rows must be JSON objects"),
    "null-row.jsonl": (_deep_bad("null"), "line 50: rows must be JSON objects"),
    "broken.jsonl": (_deep_bad('{"text": "unterminated'), "line 50: not valid JSON"),
    "deep.jsonl": (_deep_bad('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"), "line 50: JSON nested too deeply"),
    "latin1.txt": (
        "\n".join(GOOD[:49]).encode() + "\ncaf\u00e9 cr\u00e8me\n".encode("latin-1") + "\n".join(GOOD[49:]).encode(),
        "line 50 is not UTF-8 text",
    ),
    "utf16.txt": ("\n".join(GOOD).encode("utf-16"), "line 1 is not UTF-8 text"),
    "binary.txt": (bytes(range(256)) * 64, "is not UTF-8 text"),
    "fake.txt.gz": ("\n".join(GOOD).encode(), "'fake.txt.gz' cannot be read as txt"),
    "fake.jsonl.zst": (_jsonl([{"text": t} for t in GOOD]), "'fake.jsonl.zst' cannot be read as jsonl"),
    "corrupt.parquet": (b"PAR1" + bytes(range(256)) * 8 + b"PAR1", "'corrupt.parquet' cannot be read as parquet"),
    "numbers.parquet": (_parquet(list(range(300))), "row 1: column 'text' holds int"),
    "items.json": (
        json.dumps([{"text": t} for t in GOOD[:49]] + [7] + [{"text": t} for t in GOOD[49:]]).encode(),
        "item 50: rows must be JSON objects",
    ),
    "scalar.json": (b"42", "holds a JSON int"),
}


def _extract(tiny_models, data: str, store: Path, *extra: str) -> list[str]:
    return [
        "extract",
        "--model",
        str(tiny_models["gpt2"]),
        "--dataset",
        data,
        "--store",
        str(store),
        "--context-size",
        "32",
        "--max-tokens",
        "2048",
        "--shard-tokens",
        "512",
        "--device",
        "cpu",
        *extra,
    ]


def _one_line(capfd, code: int, expected: str, want_code: int = 2) -> str:
    err = capfd.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("actcache: ")]
    assert code == want_code and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == lines[-1] and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("actcache: error: ") and expected in lines[0], lines
    # Printed once: not also as a failed task's and a failed flow's log lines (Prefect's records keep those).
    assert "Task run" not in err and "Flow run" not in err and "Finished in state" not in err, err[-3000:]
    return lines[0]


@pytest.mark.parametrize("name", list(DATA))
def test_bad_data_deep_in_a_file_is_one_line_before_anything_is_written(tiny_models, tmp_path, prefect_console, name):
    data, expected = DATA[name]
    path = tmp_path / "data" / name
    path.parent.mkdir()
    path.write_bytes(data)
    store = tmp_path / "store"
    _one_line(prefect_console, main(_extract(tiny_models, str(path), store)), expected)
    assert not store.exists(), "the token cache was written before the input was validated"


def test_the_second_file_of_a_folder_is_named(tiny_models, tmp_path, prefect_console):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("\n".join(GOOD[:20]) + "\n")
    (tmp_path / "data" / "b.jsonl").write_bytes(_deep_bad({"text": 1.5}))
    store = tmp_path / "store"
    _one_line(prefect_console, main(_extract(tiny_models, str(tmp_path / "data"), store)), "'b.jsonl' line 50")
    assert not store.exists()


def _model_copy(tiny_models, tmp_path: Path, drop=(), write=None) -> Path:
    import shutil

    dest = tmp_path / "model"
    shutil.copytree(tiny_models["gpt2"], dest)
    for name in drop:
        (dest / name).unlink()
    for name, text in (write or {}).items():
        (dest / name).write_text(text)
    return dest


@pytest.mark.parametrize(
    "case,expected",
    [
        ("no tokenizer files", "cannot tokenize"),
        ("config.json not JSON", "has no usable config.json"),
        ("config.json of an unknown model_type", "has no usable config.json"),
        ("config.json a list", "has no usable config.json"),
    ],
)
def test_broken_model_folders(tiny_models, corpus, tmp_path, prefect_console, case, expected):
    model = {
        "no tokenizer files": lambda: _model_copy(
            tiny_models, tmp_path, drop=("tokenizer.json", "tokenizer_config.json")
        ),
        "config.json not JSON": lambda: _model_copy(tiny_models, tmp_path, write={"config.json": "{"}),
        "config.json of an unknown model_type": lambda: _model_copy(
            tiny_models, tmp_path, write={"config.json": '{"model_type": "no-such-architecture"}'}
        ),
        "config.json a list": lambda: _model_copy(tiny_models, tmp_path, write={"config.json": "[1, 2]"}),
    }[case]()
    store = tmp_path / "store"
    argv = _extract(tiny_models, str(corpus), store)
    argv[argv.index("--model") + 1] = str(model)
    _one_line(prefect_console, main(argv), expected)
    assert not store.exists()


@pytest.mark.parametrize(
    "device,expected",
    [
        ("bogus", "is not a device"),
        ("cuda", "CUDA is not available"),
        ("cuda:3", "CUDA is not available"),
        ("mps", "MPS is not available"),
        ("xla", "unsupported device type"),
    ],
)
def test_bad_device(tiny_models, corpus, tmp_path, prefect_console, device, expected):
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    store = tmp_path / "store"
    argv = _extract(tiny_models, str(corpus), store)
    argv[argv.index("--device") + 1] = device
    _one_line(prefect_console, main(argv), expected)
    assert not store.exists()


@pytest.fixture(scope="module")
def few_head_models(tiny_models, tmp_path_factory) -> dict[int, Path]:
    """GPT-2s with 2, 3 and 5 heads: an attention pattern [batch, heads, q, k] must never pass as per-token."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    out = {}
    for heads in (2, 3, 5):
        path = tmp_path_factory.mktemp(f"heads{heads}")
        torch.manual_seed(0)
        GPT2LMHeadModel(
            GPT2Config(
                vocab_size=len(tok), n_positions=64, n_embd=30, n_layer=2, n_head=heads, bos_token_id=0, eos_token_id=0
            )
        ).save_pretrained(path)
        tok.save_pretrained(path)
        out[heads] = path
    return out


@pytest.mark.parametrize("heads", [2, 3, 5])
@pytest.mark.parametrize("hook", ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_attn_scores"])
def test_a_hook_that_is_not_per_token_is_refused_whatever_the_head_count(
    few_head_models, corpus, tmp_path, prefect_console, heads, hook
):
    store = tmp_path / "store"
    argv = [
        "extract",
        "--model",
        str(few_head_models[heads]),
        "--dataset",
        str(corpus),
        "--store",
        str(store),
        "--hook",
        hook,
        "--context-size",
        "16",
        "--max-tokens",
        "64",
        "--shard-tokens",
        "32",
        "--device",
        "cpu",
    ]
    _one_line(prefect_console, main(argv), "not one vector per token")
    assert not store.exists()


def test_storage_failure_mid_run_is_one_line_exit_1(base_config, monkeypatch, prefect_console):
    import errno
    import os

    real_fsync, calls = os.fsync, {"n": 0}

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] > 6:  # after the token cache, part way through the shards
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    argv = config_argv(base_config, hook=None)
    _one_line(prefect_console, main(argv), "File too large", want_code=1)


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.subprocess
@pytest.mark.slow  # several CLI processes: `make test` runs it, `make test-fast` does not
def test_file_size_limit_in_a_real_process_is_one_line_exit_1(base_config, tmp_path):
    """RLIMIT_FSIZE as a quota would set it: the write fails with EFBIG (Python ignores SIGXFSZ)."""
    import resource
    import subprocess
    import sys

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    from prefect.settings import PREFECT_API_URL

    argv = [sys.executable, "-m", "actcache.cli.app", *_extract_args(base_config)]
    env = {**__import__("os").environ, "TQDM_DISABLE": "1", "PREFECT_API_URL": PREFECT_API_URL.value()}
    p = subprocess.run(argv, capture_output=True, text=True, timeout=600, preexec_fn=limit, cwd=tmp_path, env=env)
    lines = [line for line in p.stderr.strip().splitlines() if line.startswith("actcache: ")]
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert len(lines) == 1 and "cannot write" in lines[0] and "File too large" in lines[0], p.stderr[-3000:]


def _extract_args(cfg) -> list[str]:
    return config_argv(cfg, hook=None)


@pytest.mark.parametrize("how", ["--debug", "ACTCACHE_TRACEBACK=1"])
def test_debug_shows_the_whole_chain_with_the_original_cause(
    tiny_models, corpus, tmp_path, prefect_console, monkeypatch, how
):
    model = _model_copy(tiny_models, tmp_path, write={"config.json": "{"})
    argv = _extract(tiny_models, str(corpus), tmp_path / "store")
    argv[argv.index("--model") + 1] = str(model)
    if how == "--debug":
        argv.append("--debug")
    else:
        monkeypatch.setenv("ACTCACHE_TRACEBACK", "1")
    assert main(argv) == 2
    err = prefect_console.readouterr().err
    assert "Traceback" in err and "JSONDecodeError" in err  # what transformers raised, kept as the cause
    assert "The above exception was the direct cause" in err
    assert err.strip().splitlines()[-1].startswith("actcache: error: model ") and "config.json" in err


def test_bad_input_inside_the_flow_with_debug_keeps_prefects_traceback(tiny_models, tmp_path, prefect_console):
    path = tmp_path / "number.jsonl"
    path.write_bytes(DATA["number.jsonl"][0])
    assert main(_extract(tiny_models, str(path), tmp_path / "store", "--debug")) == 2
    err = prefect_console.readouterr().err
    assert err.count("Traceback") >= 2  # Prefect's own (the task failed) and the CLI's chain
    assert err.strip().splitlines()[-1].startswith("actcache: error: dataset file 'number.jsonl' line 50")


def test_help_documents_exit_codes_and_debug(capsys):
    for argv in (["--help"], ["extract", "--help"], ["verify", "--help"]):
        assert main(argv) == 0
        out = " ".join(capsys.readouterr().out.replace("│", " ").split()).lower()
        assert "exit codes: 0 success; 1 failure" in out and "2 bad input" in out and "--debug" in out, argv


def test_null_and_empty_texts_are_skipped_not_errors(tmp_path):
    from actcache.inputs.sources import DatasetSpec, open_source

    path = tmp_path / "gaps.jsonl"
    path.write_bytes(_jsonl([{"text": "first"}, {"text": None}, {"text": ""}, {"text": "second"}]))
    assert list(open_source(DatasetSpec(str(path))).texts()) == ["first", "second"]


@pytest.fixture(scope="module")
def unresized_model(tiny_models, tmp_path_factory) -> Path:
    """The tiny GPT-2 with a BOS and a pad token added to its tokenizer (ids 512 and 513) and its embeddings not
    resized (512 rows): common after adding a pad token for a fine-tune."""
    import shutil

    from transformers import AutoTokenizer

    dest = tmp_path_factory.mktemp("unresized") / "model"
    shutil.copytree(tiny_models["gpt2"], dest)
    tok = AutoTokenizer.from_pretrained(dest)
    tok.add_special_tokens({"bos_token": "<|bos|>", "pad_token": "<|pad|>"})
    tok.save_pretrained(dest)
    assert (tok.bos_token_id, tok.pad_token_id) == (512, 513)
    return dest


@pytest.mark.parametrize(
    "case,extra,expected",
    [
        ("BOS prepended", (), "the tokenizer's BOS token is id 512 ('<|bos|>')"),
        ("in the text", ("--no-prepend-bos", "--separator", "none"), "a token of the dataset's text is id 513"),
        (
            "pad of examples",
            ("--packing", "none", "--positions", "last", "--no-prepend-bos", "--separator", "none"),
            "the tokenizer's pad token is id 513",
        ),
        (
            "pretokenized",
            ("--token-column", "ids", "--no-prepend-bos", "--separator", "none"),
            "token id 600 in dataset row 1 is outside the model's vocabulary (0..511)",
        ),
    ],
)
def test_token_ids_the_model_does_not_embed_are_refused_before_writing(
    unresized_model, tiny_models, tmp_path, prefect_console, case, extra, expected
):
    """A tokenizer with tokens the model was not resized for: the forward pass would fail with torch's "index out
    of range in self" after the token cache was written; the ids a run feeds the model are checked first."""
    data = tmp_path / "data.jsonl"
    rows = [{"text": "hello <|pad|> world " * 20, "ids": [5, 6, 7] * 20}, {"text": "more words", "ids": [5, 600]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 40))
    store = tmp_path / "store"
    argv = _extract(tiny_models, str(data), store, *extra)
    argv[argv.index("--model") + 1] = str(unresized_model)
    _one_line(prefect_console, main(argv), expected)
    assert not store.exists()


@pytest.mark.parametrize(
    "rows,columns,expected",
    [
        ([{"text": "a b c", "src": "x", "src.utf8": 7}], "src,src.utf8", "names both 'src' and 'src.utf8'"),
        ([{"text": "a b c", "a": 1, "a.offsets": 2}], "a,a.offsets", "names both 'a' and 'a.offsets'"),
        ([{"text": "a b c", "label": 1}, {"text": "d e", "label": 2**64}], "label", "outside int64"),
        ([{"text": "a b c", "s": "ok"}, {"text": "d e", "s": "bad \ud800 x"}], "s", "not valid Unicode"),
    ],
    ids=["utf8 part", "offsets part", "int beyond int64", "lone surrogate"],
)
def test_kept_columns_the_shard_cannot_hold_are_refused_before_writing(
    tiny_models, tmp_path, prefect_console, rows, columns, expected
):
    """A kept column whose stored name collides with a text column's parts (the set read as damaged, with no
    repair), an integer beyond int64 or a lone surrogate (both failed after the forward pass, exit 1, 'rerun')."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    store = tmp_path / "store"
    extra = ("--packing", "none", "--positions", "last", "--keep-columns", columns)
    _one_line(prefect_console, main(_extract(tiny_models, str(data), store, *extra)), expected)
    assert not store.exists()
