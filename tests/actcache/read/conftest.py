"""Sets the reader's tests share, written once per session: read them; copy one before changing it."""

from __future__ import annotations

import pytest
import setwriter

from actcache.sets.copy import copy_set

CTX = 32


@pytest.fixture(scope="session")
def local_set(make_config, tmp_path_factory) -> str:
    """One extracted set of 8 shards (4 sequences of 32 tokens each) on local disk, written by the flow's stages."""
    local = tmp_path_factory.mktemp("dataset-store")
    return setwriter.extract_by_stages(make_config(context_size=CTX, max_tokens=1024, store=str(local)))


@pytest.fixture(scope="session")
def s3_set(local_set, s3_server) -> str:
    """``local_set`` copied to S3."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3_server.env("writer").items():
            mp.setenv(k, v)
        return copy_set(local_set, s3_server.new_prefix()).url


@pytest.fixture
def s3_url(s3_set, s3_env):
    return s3_set


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """Sets written by the real shard encoder: 5 shards (the last shorter), d=8, with statistics."""
    root = tmp_path_factory.mktemp("synthetic")
    return setwriter.write_set(root, shards=5, seqs=4, ctx=16, d=8, last_seqs=3, with_stats=True)
