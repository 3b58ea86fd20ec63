"""Errors name config fields: as fields where the config is written (Python, flows), as flags on the CLI."""

from __future__ import annotations

import pickle

import pytest

from actcache.config import ExtractConfig
from actcache.errors import ActcacheError, opt


def test_fields_read_as_fields_and_render_as_flags():
    e = ActcacheError(f"no BOS; set {opt('prepend_bos', False)} or {opt('separator', 'none')}, "
                      f"or raise {opt('max_tokens')}")
    assert str(e) == "no BOS; set prepend_bos=False or separator='none', or raise max_tokens"
    assert e.for_cli() == "no BOS; set --no-prepend-bos or --separator none, or raise --max-tokens"
    assert e.fields == ["prepend_bos", "separator", "max_tokens"]
    assert repr(e) == f"ActcacheError({str(e)!r})" and "{opt:" not in repr(e)
    back = pickle.loads(pickle.dumps(ActcacheError("unknown hook 'x'", field="hook")))  # crosses Prefect's results
    assert back.fields == ["hook"] and str(back) == back.for_cli() == "unknown hook 'x'"


def test_a_bad_config_names_its_field():
    with pytest.raises(ActcacheError) as e:
        ExtractConfig(max_tokens=10)
    assert str(e.value).startswith("max_tokens 10 is below one context") and "--" not in str(e.value)
    assert e.value.for_cli().startswith("--max-tokens 10 is below one context")
    assert e.value.fields == ["max_tokens", "context_size"]
