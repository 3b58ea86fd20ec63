"""How errors reach a person: one line, exit 2 for bad input and 1 for failures, the chain with --debug (the
console without Prefect's tracebacks: tests/actcache/orchestration/test_logs.py); errors name config fields, as
fields where the config is written (Python, flows) and as flags on the CLI."""

from __future__ import annotations

import pickle

import pytest

from actcache import errors
from actcache.config import ExtractConfig
from actcache.errors import ActcacheError, Failure, opt


def test_fields_read_as_fields_and_render_as_flags():
    e = ActcacheError(
        f"no BOS; set {opt('prepend_bos', False)} or {opt('separator', 'none')}, or raise {opt('max_tokens')}"
    )
    assert str(e) == "no BOS; set prepend_bos=False or separator='none', or raise max_tokens"
    assert e.for_cli() == "no BOS; set --no-prepend-bos or --separator none, or raise --max-tokens"
    assert e.fields == ["prepend_bos", "separator", "max_tokens"]
    assert repr(e) == f"ActcacheError({str(e)!r})" and "{opt:" not in repr(e)
    back = pickle.loads(pickle.dumps(ActcacheError("unknown hook 'x'", field="hook")))  # crosses Prefect's results
    assert back.fields == ["hook"] and str(back) == back.for_cli() == "unknown hook 'x'"


def test_a_field_whose_flag_is_spelled_otherwise_renders_as_that_flag(capsys):
    e = ActcacheError(f"{opt('rows_per_shard')} must be at least 1; or {opt('prepend_bos', False)}")
    assert str(e) == "rows_per_shard must be at least 1; or prepend_bos=False"
    names = {"rows_per_shard": "--shard-rows", "prepend_bos": "--bos"}
    assert e.for_cli(names) == "--shard-rows must be at least 1; or --no-bos"
    assert e.for_cli() == "--rows-per-shard must be at least 1; or --no-prepend-bos"
    assert errors.report(e, flag_names=names) == 2
    assert capsys.readouterr().err.strip() == "actcache: error: --shard-rows must be at least 1; or --no-bos"


def test_a_bad_config_names_its_field():
    with pytest.raises(ActcacheError) as e:
        ExtractConfig(max_tokens=10)
    assert str(e.value).startswith("max_tokens 10 is below one context") and "--" not in str(e.value)
    assert e.value.for_cli().startswith("--max-tokens 10 is below one context")
    assert e.value.fields == ["max_tokens", "context_size"]


def _raise(exc: BaseException, cause: BaseException | None = None) -> BaseException:
    try:
        try:
            if cause is not None:
                raise cause
        except BaseException as c:
            raise exc from c
        raise exc
    except BaseException as e:
        return e


@pytest.mark.parametrize(
    "exc,code,line",
    [
        (ActcacheError("bad   --hook\n x"), 2, "actcache: error: bad --hook x"),
        (Failure("cannot write s3://b/x (No space left on device)"), 1, "actcache: error: cannot write"),
        (RuntimeError("wrapped by a library"), 1, "actcache: error: RuntimeError: wrapped by a library"),
        (KeyboardInterrupt(), 130, "actcache: interrupted"),
    ],
)
def test_report_is_one_line_with_the_exit_code(capsys, exc, code, line):
    assert errors.report(_raise(exc)) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(line), err


def test_an_actcache_error_wrapped_by_a_library_is_still_its_own_line(capsys):
    wrapped = _raise(RuntimeError("task failed"), ActcacheError("dataset file 'a.jsonl' line 3: ..."))
    assert errors.report(wrapped) == 2
    assert capsys.readouterr().err.strip() == "actcache: error: dataset file 'a.jsonl' line 3: ..."


def test_debug_prints_the_whole_chain_then_the_line(capsys):
    exc = _raise(ActcacheError("model 'm' has no usable config.json"), ValueError("Expecting value: line 1"))
    assert errors.report(exc, debug=True) == 2
    err = capsys.readouterr().err
    assert "ValueError: Expecting value" in err and "direct cause" in err
    assert err.strip().splitlines()[-1] == "actcache: error: model 'm' has no usable config.json"


def test_storage_failures_are_failures_and_bad_input_is_not():
    from actcache.storage.failures import StoreUnavailable
    from actcache.storage.store import DamagedFile

    assert StoreUnavailable("x").exit_code == 1 and DamagedFile("x").exit_code == 1
    assert isinstance(DamagedFile("x"), ValueError)  # content problems are handled where bad JSON is
    assert ActcacheError("x").exit_code == 2
