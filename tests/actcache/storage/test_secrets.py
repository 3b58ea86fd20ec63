"""No credential from any input is stored or shown: a marker secret in each input is refused in one line (exit 2)
that does not hold it, and appears in no file written, in neither stdout nor stderr."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from actcache.cli.app import main
from actcache.storage import secrets

MARK = "Mark3rS3cretZq"


def _files_holding(root: Path, text: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


EXTRACT_INPUTS = [
    ("--dataset", f"http://reader:{MARK}@127.0.0.1:9/corpus.jsonl"),
    ("--dataset", f"https://127.0.0.1:9/corpus.jsonl?token={MARK}"),
    ("--dataset", f"https://b.s3.amazonaws.com/c.jsonl?X-Amz-Credential=a&X-Amz-Signature={MARK}"),
    ("--dataset", f"https://127.0.0.1:9/corpus.jsonl#access_token={MARK}"),
    ("--dataset", f"https://127.0.0.1:9/corpus.jsonl;jsessionid={MARK}"),
    ("--dataset", f"https://127.0.0.1:9/hf_{MARK}{MARK}{MARK}/corpus.jsonl"),
    ("--model", f"https://{MARK}@127.0.0.1:9/gpt2"),
    ("--model", f"https://127.0.0.1:9/ghp_{MARK * 3}/gpt2"),
    ("--store", f"s3://AKEY:{MARK}@bucket/acts"),
    ("--store", f"s3://bucket/acts?X-Amz-Signature={MARK}"),
    ("--aws-credentials-block", f"https://u:{MARK}@x"),
    ("--storage-options", '{"endpoint_url": "http://u:' + MARK + '@127.0.0.1:9"}'),
    ("--storage-options", '{"client_kwargs": {"aws_secret_access_key": "' + MARK + '"}}'),
    # A fragment (OAuth's implicit flow), a ';'-separated parameter, short password names, a bare hub token.
    ("--dataset", f"https://127.0.0.1:9/corpus.jsonl#access_token={MARK}"),
    ("--dataset", f"https://127.0.0.1:9/corpus.jsonl?a=1;token={MARK}"),
    ("--dataset", f"https://127.0.0.1:9/corpus.jsonl?pwd={MARK}"),
    ("--dataset", f"https://127.0.0.1:9/corpus.jsonl?jwt={MARK}"),
    ("--model", f"hf_{MARK}{MARK}{MARK}"),
    ("--dataset", f"user/corpus?token={MARK}"),  # a query with no scheme before it
]


@pytest.mark.parametrize("flag,value", EXTRACT_INPUTS, ids=[f"{f} {v[:24]}" for f, v in EXTRACT_INPUTS])
def test_extract_refuses_credentials_in_any_input(base_config, tmp_path, capsys, monkeypatch, flag, value):
    monkeypatch.chdir(tmp_path)
    given = {"--model": base_config.model, "--dataset": base_config.dataset, "--store": str(tmp_path / "s")}
    given[flag] = value
    argv = ["extract", *(x for kv in given.items() for x in kv), "--hook", base_config.hook, "--device", "cpu"]
    code = main([*argv, "--max-tokens", "128", "--context-size", "32"])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "credentials" in lines[0], err
    assert MARK not in out + err and _files_holding(tmp_path, MARK) == []
    assert not (tmp_path / "s").exists()


def test_an_endpoint_variable_with_credentials_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://u:{MARK}@127.0.0.1:9")
    code = main(["ls", "s3://bucket/acts"])
    out, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1 and "AWS_ENDPOINT_URL holds credentials" in err
    assert MARK not in out + err


STORE_COMMANDS = [
    ["ls", "{url}"],
    ["show", "{url}/0123456789abcdef01234567"],
    ["verify", "{url}/0123456789abcdef01234567"],
    ["stats", "{url}/0123456789abcdef01234567"],
    ["rm", "{url}/0123456789abcdef01234567", "--yes"],
    ["gc", "{url}"],
    ["cp", "{set}", "{url}"],
    ["shuffle", "{set}", "--out", "{url}"],
]


@pytest.mark.parametrize("argv", STORE_COMMANDS, ids=[a[0] for a in STORE_COMMANDS])
@pytest.mark.parametrize("url", [f"s3://AKEY:{MARK}@bucket/acts", f"http://127.0.0.1:9/acts?token={MARK}"])
def test_every_command_refuses_a_store_url_with_credentials(extracted_set, tmp_path, capsys, argv, url):
    src = shutil.copytree(Path(extracted_set).parent, tmp_path / "src")
    set_url = f"{src}/{Path(extracted_set).name}"
    code = main([a.format(url=url, set=set_url) for a in argv])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "the store URL holds credentials" in lines[-1], err
    assert MARK not in out + err and _files_holding(tmp_path, MARK) == []


@pytest.mark.parametrize(
    "value",
    [
        f"https://h/c.jsonl#access_token={MARK}",
        f"https://h/c.jsonl#a=1&id_token={MARK}",
        f"https://h/x;jsessionid={MARK}/c.jsonl",
        f"https://h/{'hf_' + 'a1B2' * 9}/c.jsonl",
        f"{'ghp_' + 'a1B2' * 9}",
        f"https://h/{'github_pat_' + 'a1B2_' * 9}",
        f"https://h/{'glpat-' + 'a1B2' * 6}",
    ],
)
def test_a_credential_in_a_fragment_path_parameter_or_known_token_shape_is_found(value):
    """The query was checked, the rest of a URL was not: a fragment's or path parameter's token, and the tokens of
    the hosts datasets and models come from, went into the manifest and flow parameters."""
    assert secrets.secret_in(value) is not None
    shown = secrets.redact(f"error: {value} failed")
    assert MARK not in shown and "a1B2a1B2" not in shown, shown


def test_redact_hides_what_a_library_might_echo():
    text = f"failed: s3://K:{MARK}@b/x and https://h/p?a=1&X-Amz-Signature={MARK} and AKIAABCDEFGHIJKLMNOP"
    shown = secrets.redact(text)
    assert MARK not in shown and "AKIA" not in shown and "https://h/p?a=1&X-Amz-Signature=***" in shown
    shown = secrets.redact(f"at https://h/p#access_token={MARK}&x=1 and https://h/q?a=1;sig={MARK}")
    assert MARK not in shown and "https://h/p#access_token=***&x=1" in shown


@pytest.mark.parametrize(
    "value",
    [
        "s3://bucket/prefix",
        "https://huggingface.co/datasets/x?author=me",
        "/data/corpus.jsonl",
        "gpt2",
        "https://h/docs.html#section=2",
        "https://h/x;v=2/c.jsonl",
        "hf://datasets/hf_internal/c",
        "https://h/readme.html#section-2",
        "hf://datasets/user/hf_corpus",
    ],
)
def test_ordinary_values_pass(value):
    assert secrets.secret_in(value) is None


LOCAL_INPUTS = [
    ["export", "{set}", "{tmp}/out?token={mark}", "--format", "hf"],
    ["export", "{set}", "file://{tmp}/out?X-Amz-Signature={mark}", "--format", "hf"],
    ["export", "{set}", "{tmp}/out#access_token={mark}", "--format", "hf"],
    ["export", "{set}", "{tmp}/out", "--format", "hf", "--exclude-ids", "{tmp}/ids?sig={mark}"],
    ["ls", "{tmp}/no-store?token={mark}"],
    ["show", "{tmp}/s;jsessionid={mark}/0123456789abcdef01234567"],
    ["cp", "{set}", "{tmp}/dest?api_key={mark}"],
    ["shuffle", "{set}", "--out", "file://{tmp}/o?X-Amz-Signature={mark}"],
    ["extract", "--like", "{tmp}/x?token={mark}/0123456789abcdef01234567"],
]


@pytest.mark.parametrize("argv", LOCAL_INPUTS, ids=[" ".join(a[:1] + a[2:3])[:40] for a in LOCAL_INPUTS])
@pytest.mark.parametrize("debug", [False, True])
def test_a_local_path_with_a_credential_is_refused_or_redacted_everywhere(extracted_set, tmp_path, capsys, argv, debug):
    """A local path (or file:// URL) holding a credential-looking query: every command refuses it or names it
    redacted, with --debug's traceback too; the marker is in no output and in no file or folder name."""
    src = shutil.copytree(Path(extracted_set).parent, tmp_path / "src")
    args = [a.format(set=f"{src}/{Path(extracted_set).name}", tmp=tmp_path, mark=MARK) for a in argv]
    code = main([*args, *(["--debug"] if debug else [])])
    out, err = capsys.readouterr()
    assert code != 0 and err.strip().splitlines()[-1].startswith("actcache: error: "), err
    assert MARK not in out + err and _files_holding(tmp_path, MARK) == []
    assert not [p for p in tmp_path.rglob("*") if MARK in p.name]


def test_every_error_actcache_raises_is_redacted_for_python_callers_too(extracted_set, tmp_path):
    """The one rule applies where an error is made (``ActcacheError``), not only where the command line prints it:
    a Python caller, a log line or a Prefect state holds no credential a message echoes (a path, ``opt(f, value)``)."""
    from actcache.errors import ActcacheError, opt
    from actcache.sets.export import export_set

    for message in (
        f"no file at /data/x?token={MARK}",
        f"unknown {opt('format', 'x?sig=' + MARK)}",
        f"cannot read file:///x?X-Amz-Signature={MARK}&a=1",
    ):
        e = ActcacheError(message)
        assert MARK not in str(e) and MARK not in e.for_cli() and MARK not in repr(e), e
    with pytest.raises(ActcacheError) as e:
        export_set(extracted_set, str(tmp_path / f"out?token={MARK}"), format="hf")
    assert MARK not in str(e.value) and not list(tmp_path.iterdir())


def test_a_traceback_printed_for_debug_is_redacted(capsys):
    """--debug prints the chain of causes: a library's exception that echoes a path with its credential is shown
    redacted, as the one-line error is."""
    from actcache.errors import report

    try:
        try:
            raise FileNotFoundError(f"[Errno 2] No such file: '/data/x?token={MARK}'")
        except FileNotFoundError as e:
            raise RuntimeError(f"reading s3://b/x?X-Amz-Signature={MARK} failed") from e
    except RuntimeError as e:
        assert report(e, debug=True) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "FileNotFoundError" in err and MARK not in err, err
