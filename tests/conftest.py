"""Shared fixtures: tiny random-weight models built locally, a local corpus, one Prefect harness."""

from __future__ import annotations

import os
import tempfile

# Before anything imports prefect or huggingface_hub: isolate state and never touch the network.
_SESSION_TMP = tempfile.mkdtemp(prefix="actcache-tests-")
os.environ.setdefault("PREFECT_HOME", os.path.join(_SESSION_TMP, "prefect"))
os.environ["ACTCACHE_CACHE_DIR"] = os.path.join(_SESSION_TMP, "cache")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("TQDM_DISABLE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from actcache import demo  # noqa: E402


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return Path(_SESSION_TMP)


@pytest.fixture(scope="session")
def tiny_models(session_tmp: Path) -> dict[str, Path]:
    """Random-weight GPT-2, Llama and GPT-NeoX models with a trained BPE tokenizer (save_pretrained)."""
    return {arch: demo.build_tiny_model(session_tmp / "models" / arch, arch, layers=3, d=32, ctx=128)
            for arch in ("gpt2", "llama", "neox")}


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
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def base_config(tiny_models, corpus, store):
    """A small, fast extraction config on the tiny GPT-2 (4 shards of 4 sequences of 32 tokens)."""
    from actcache.config import ExtractConfig

    return ExtractConfig(model=str(tiny_models["gpt2"]), hook="blocks.1.hook_resid_post", dataset=str(corpus),
                         context_size=32, max_tokens=512, shard_tokens=128, batch_size=4, store=str(store),
                         device="cpu")
