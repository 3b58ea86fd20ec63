"""The bad-input catalogue across the CLI, the Python API and deployment parameters.

Every entry: one line naming the problem and the fix, a non-zero exit (or an exception), and the store
exactly as it was. (`tests/actcache/test_cli.py` holds the `extract` option catalogue.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import actcache
from actcache.cli import main

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def good_set(tiny_models, corpus, tmp_path_factory) -> str:
    from actcache.config import ExtractConfig

    store = tmp_path_factory.mktemp("store")
    return actcache.extract(ExtractConfig(model=str(tiny_models["gpt2"]), dataset=str(corpus), context_size=32,
                                          max_tokens=256, shard_tokens=128, store=str(store)))


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
    from flows.extract import extract_activations

    with pytest.raises(Exception) as e:  # noqa: B017 - pydantic's or ours, the message is the contract
        extract_activations.validate_parameters(params)
    assert expected in str(e.value)


def test_bad_partition_fails_the_run_in_one_line(base_config):
    from flows.extract import extract_activations

    state = extract_activations(base_config, partition_index=4, num_partitions=4, return_state=True)
    assert state.is_failed()
    with pytest.raises(actcache.ActcacheError, match="partition 4 of 4 is invalid"):
        state.result()
    assert not Path(base_config.store).exists()
