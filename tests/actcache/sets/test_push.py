"""``actcache push`` against the fake hub (tests/hub_server.py): every byte lands, reruns resume, refusals are
one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actcache.cli import app as cli
from actcache.errors import ActcacheError
from actcache.format import layout
from actcache.read.reader import open_set
from actcache.sets import push


def set_files(url: str) -> dict[str, bytes]:
    root = Path(url)
    return {f"{root.name}/{p.relative_to(root)}": p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_push_uploads_the_set_and_a_card_then_reads_back(extracted_set, hub, capsys):
    repo = hub.new_repo_id("acts")
    assert cli.main(["push", extracted_set, repo, "--private"]) == 0
    out = capsys.readouterr()
    sid = Path(extracted_set).name
    assert out.out.strip().splitlines()[-1] == f"hf://datasets/{repo}/{sid}"
    assert "uploaded 10 files" in out.err and "0 already on the hub" in out.err
    assert "push: 10/10 files" in out.err  # off a terminal: progress with its total
    files = hub.files(repo, repo_type="dataset")
    assert {k: v for k, v in files.items() if k.startswith(sid)} == set_files(extracted_set)
    readme = files["README.md"].decode()
    assert "viewer: false" in readme and f'actcache.open_set("hf://datasets/{repo}/{sid}")' in readme
    assert "blocks.1.hook_resid_post" in readme and "scale sqrt(d) / mean norm" in readme
    shard_commit = hub.requests_matching(rf"/{repo}/commit/")
    assert len(shard_commit) == 2  # shards and records, then manifest and card

    back = open_set(f"hf://datasets/{repo}/{sid}")  # through huggingface_hub's fsspec filesystem
    assert back.manifest == json.loads(Path(extracted_set, layout.MANIFEST).read_text())
    assert back.verify() == []

    hub.clear_requests()
    assert cli.main(["push", extracted_set, repo]) == 0
    assert "uploaded 0 files" in capsys.readouterr().err
    assert not hub.requests_matching(rf"/{repo}/commit/") and not hub.requests_matching(r"/_lfs/")


def test_an_interrupted_push_resumes_with_what_is_missing(extracted_set, hub):
    repo = hub.new_repo_id("resume")
    commits = []

    def after(n):  # the second commit is refused by a failing hub
        commits.append(n)
        if len(commits) == 1:
            hub.fail_next(r"/commit/", status=500, retry_after=None)

    with pytest.raises(ActcacheError, match=r"HTTP 500 while uploading to .*rerun the same push to resume"):
        push.push_set(extracted_set, repo, commit_files=3, on_commit=after)
    assert len(hub.files(repo, repo_type="dataset")) == 1 + 3  # .gitattributes and the first commit
    assert f"{Path(extracted_set).name}/{layout.MANIFEST}" not in hub.files(repo, repo_type="dataset")
    hub.clear_requests()
    result = push.push_set(extracted_set, repo, commit_files=3)
    assert (result.uploaded, result.skipped) == (10 - 3, 3)
    assert {
        k: v for k, v in hub.files(repo, repo_type="dataset").items() if k.startswith(Path(extracted_set).name)
    } == set_files(extracted_set)


def test_a_revision_is_a_branch(extracted_set, hub):
    repo = hub.new_repo_id("rev")
    push.push_set(extracted_set, repo, revision="v1")
    assert "README.md" in hub.files(repo, revision="v1", repo_type="dataset")
    assert "README.md" not in hub.files(repo, repo_type="dataset")


def test_refusals_are_one_line_without_the_token(extracted_set, hub, capsys, monkeypatch):
    repo = hub.new_repo_id("locked")
    push.push_set(extracted_set, repo)
    hub.set_repo(repo, repo_type="dataset", read_only=True)
    monkeypatch.setattr(push, "card", lambda *a: "changed\n")
    assert cli.main(["push", extracted_set, repo]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HTTP 403" in err[0]

    monkeypatch.setenv("HF_TOKEN", "hf_notavalidtokenatall")
    assert cli.main(["push", extracted_set, hub.new_repo_id("x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rejected the token" in err[0] and "hf_notavalid" not in err[0]

    assert cli.main(["push", str(Path(extracted_set).parent / ("0" * 24)), hub.new_repo_id("y")]) == 2
    assert "no activation set at" in capsys.readouterr().err


def test_the_card_describes_every_set_in_the_repo_and_no_local_path(extracted_set, hub, tmp_path, capsys):
    from actcache.sets.shuffle import shuffle_set

    repo = hub.new_repo_id("two")
    copy = shuffle_set(extracted_set, out=str(tmp_path), seed=1).url  # a second set: a shuffled copy
    push.push_set(extracted_set, repo)
    assert cli.main(["push", copy, repo, "--json"]) == 0  # the second push rewrites the card: both sets stay on it
    pushed = json.loads(capsys.readouterr().out)
    assert pushed["url"] == f"hf://datasets/{repo}/{Path(copy).name}" and pushed["uploaded"] > 0
    readme = hub.files(repo, repo_type="dataset")["README.md"].decode()
    for url in (extracted_set, copy):
        assert f"## `{Path(url).name}`" in readme and f"hf://datasets/{repo}/{Path(url).name}" in readme
    assert "2 actcache activation sets" in readme and "Shuffled copy of set" in readme
    assert "/tmp" not in readme and str(tmp_path) not in readme and "a local path" in readme
    assert "pip install actcache" not in readme and "actcache[extract]" in readme


def test_the_card_shows_manifest_fields_as_text_never_as_markdown_or_html(extracted_set):
    """Another set's manifest in the repo is whoever pushed it: its names reach the card as text, not markup."""
    from markdown_it import MarkdownIt

    s = open_set(extracted_set)
    forged = json.loads(json.dumps(s.manifest))
    forged["set_id"] = "0" * 24
    forged["hook"] = "blocks.1.hook_resid_post<img src=x onerror=alert(1)>"
    forged["model"]["name"] = "org/m`` **bold** `x`"
    forged["dataset"]["name"] = "d\n\n# injected heading\n<script>alert(2)</script>"
    forged["n_tokens"] = "[link](javascript:alert(3)) <b>x</b>"
    html = MarkdownIt("commonmark").render(push.card(s, "me/acts", [forged]))
    for markup in ("<img", "<script", "<b>", "<strong>", "<h1>injected", 'href="javascript', "<a "):
        assert markup not in html, (markup, html)
    # the text itself is there, escaped, inside the lines it belongs to
    assert "blocks.1.hook_resid_post&lt;img src=x onerror=alert(1)&gt;" in html, html
    assert "org/m`` **bold** `x`" in html and "d\\n\\n# injected heading\\n&lt;script&gt;" in html, html
    assert "[link](javascript:alert(3)) &lt;b&gt;x&lt;/b&gt; tokens" in html, html


@pytest.mark.parametrize(
    "argv",
    [
        ["user/repo?token=Mark3rS3cretZq"],
        ["https://u:Mark3rS3cretZq@huggingface.co/datasets/x"],
        ["user/repo", "--revision", "https://u:Mark3rS3cretZq@h/x"],
        ["not a repo id"],
        ["a/b/c"],
    ],
)
def test_a_repo_id_or_revision_is_checked_before_the_hub_is_asked(extracted_set, capsys, monkeypatch, argv):
    """A credential in the repo id or revision (they go into the card, commits and error lines) is refused by the
    one rule, and a malformed repo id is bad input: one line, exit 2, no hub asked (it is offline here). They were
    a raw HFValidationError echoing the value, exit 1 with "rerun the same command to resume"."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["push", extracted_set, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Mark3rS3cretZq" not in err[0] and "rerun" not in err[0], err
    assert ("holds credentials" if "Mark3r" in " ".join(argv) else "is not a Hugging Face repo id") in err[0]


def test_the_card_title_counts_distinct_hooks_and_models_and_shows_no_empty_revision(extracted_set):
    """Three sets of two hooks read "2 hooks" (not 3); a local model has no revision to show (its fingerprint pins
    it); a hub model's revision is shown."""
    s = open_set(extracted_set)

    def other(n: int, **change) -> dict:
        m = json.loads(json.dumps(s.manifest))
        m["set_id"] = str(n) * 24
        for k, v in change.items():
            m[k] = v
        return m

    same_hook = other(1)
    other_hook = other(2, hook="blocks.0.hook_resid_post")
    title = push.card(s, "me/acts", [same_hook, other_hook]).split("\n# ", 1)[1].splitlines()[0]
    assert title == "2 hooks activations of `a local path`", title
    hub_model = other(3, model={**s.manifest["model"], "name": "org/model", "revision": "abc123", "fingerprint": "f"})
    card = push.card(s, "me/acts", [hub_model])
    assert card.split("\n# ", 1)[1].splitlines()[0].endswith("activations of 2 models")
    assert "revision `None`" not in card and "revision None" not in card
    assert "`org/model` (revision `abc123`, fingerprint `f`)" in card


def test_push_in_offline_mode_says_so_in_one_line(extracted_set, monkeypatch, capsys):
    """HF_HUB_OFFLINE makes every hub request fail: the push names the setting, exit 2, before reading the set."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert cli.main(["push", extracted_set, "me/acts"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HF_HUB_OFFLINE is set" in err[0]
