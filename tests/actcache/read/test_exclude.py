"""Token ids to exclude: every integer-like a tokenizer, numpy or torch gives is accepted, through one check
(``exclude.token_ids``) that the reader, the shuffle, the export and the CLI all use; anything else is one line."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import setwriter
import torch

from actcache.cli import app as cli
from actcache.errors import ActcacheError
from actcache.read.dataset import ActivationDataset
from actcache.read.exclude import parse_ids, token_ids
from actcache.read.reader import open_set
from actcache.sets.export import export_set
from actcache.sets.shuffle import shuffle_set

MANIFEST = {"tokenization": {"bos_id": 0, "separator_id": 1, "eos_id": 1, "pad_id": 2, "vocab_size": 512}}


@pytest.mark.parametrize(
    "ids",
    [
        [17, 5],
        (5, 17),
        17,
        np.int64(17),
        np.int32(17),
        np.uint16(17),
        np.array(17),
        np.array([17, 5]),
        np.array([5, 17], dtype=np.int32),
        torch.tensor(17),
        torch.tensor([17, 5]),
        torch.tensor([5, 17], dtype=torch.int32),
        [np.int64(17), torch.tensor(5)],
        [np.array([17]), torch.tensor([5])],
        range(5, 18, 12),
        [17, 17, 5],
        {17: "a", 5: "b"}.keys(),
        (i for i in (17, 5)),
        {np.int64(5), 17},
    ],
    # A generator's repr holds its address: an id that differs between processes (pytest-xdist workers must agree).
    ids=lambda v: "<generator>" if inspect.isgenerator(v) else repr(v),
)
def test_integer_likes_are_accepted_as_python_ints(ids):
    got = token_ids(MANIFEST, ids=ids)
    assert got in ((5, 17), (17,)) and all(type(i) is int for i in got)
    assert token_ids(MANIFEST, special=True, ids=got) == tuple(sorted({0, 1, 2, *got}))


@pytest.mark.parametrize(
    "ids, shown",
    [
        ([1.0], "1.0 of type float"),
        ([17, 2.5], "2.5 of type float"),
        (True, "True of type bool"),
        ([False], "False of type bool"),
        (np.float32(3), "3.0 of type float"),
        (np.array([1.5, 2]), "1.5 of type float"),
        (np.array([True]), "True of type bool"),
        (torch.tensor([1.0]), "1.0 of type float"),
        (torch.tensor(True), "True of type bool"),
        ("50256", "'50256' of type str"),
        ([None], "None of type NoneType"),
        ([[1, 2]], r"\[1, 2\] of type list"),
        (torch.tensor([1, 2], dtype=torch.bool), "True of type bool"),
    ],
    ids=repr,
)
def test_other_values_are_refused_in_one_line_naming_the_field(ids, shown):
    with pytest.raises(
        ActcacheError,
        match=f"exclude_tokens takes integer token ids .*got {shown}; pass ids such "
        r"as \[50256, 0\]",
    ) as e:
        token_ids(MANIFEST, ids=ids, option="exclude_tokens")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("ids", [np.zeros((2, 2), dtype=np.int64), torch.zeros(1, 3, dtype=torch.int64)], ids=repr)
def test_arrays_of_more_than_one_dimension_are_refused(ids):
    with pytest.raises(
        ActcacheError,
        match=r"exclude_ids takes a flat list of token ids, got an array of shape "
        r"\(\d, \d\); flatten it first",
    ) as e:
        token_ids(MANIFEST, ids=ids, option="exclude_ids")
    assert "\n" not in str(e.value)


def test_a_long_tensor_is_shown_on_one_short_line():
    with pytest.raises(ActcacheError) as e:
        token_ids(MANIFEST, ids=[torch.arange(100).float()], option="exclude_tokens")
    assert "got 0.0 of type float" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("ids", [np.array([512]), torch.tensor(-1), [np.int64(600)]], ids=repr)
def test_vocabulary_bounds_hold_for_every_kind(ids):
    with pytest.raises(ActcacheError, match="is outside the vocabulary of this set's tokenizer"):
        token_ids(MANIFEST, ids=ids)


def test_cli_text_goes_through_the_same_check():
    assert token_ids(MANIFEST, ids=parse_ids("17, 5,")) == (5, 17)
    with pytest.raises(ActcacheError, match="^exclude_ids takes comma-separated token ids") as e:  # the field
        parse_ids("5,1.5")
    assert e.value.for_cli().startswith("--exclude-ids takes")  # the CLI names the flag


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    return setwriter.write_set(tmp_path_factory.mktemp("exclude-set"), shards=2, seqs=2, ctx=8, d=4)


@pytest.mark.parametrize(
    "ids", [[1, 0], np.array([1, 0]), torch.tensor([0, 1]), [torch.tensor(1), np.int64(0)]], ids=repr
)
def test_every_entry_point_takes_numpy_and_torch_ids(small_set, tmp_path, ids):
    assert ActivationDataset(small_set, batch_size=4, exclude_tokens=ids).exclude == (0, 1)
    assert ActivationDataset(small_set, batch_size=4, exclude_tokens=np.int64(5)).exclude == (5,)
    shuffled = shuffle_set(small_set, out=str(tmp_path / "shuffled"), exclude_ids=ids)
    again = shuffle_set(small_set, out=str(tmp_path / "shuffled"), exclude_ids=[0, 1])
    assert again.skipped and again.url == shuffled.url  # the same key: the ids went in as the same ints
    assert open_set(shuffled.url).manifest["key"]["exclude"] == [0, 1]
    tokens = torch.cat([s.tokens.reshape(-1) for s in open_set(small_set)])
    exported = export_set(small_set, str(tmp_path / "hf"), format="hf", exclude_ids=ids)
    assert exported.excluded_tokens == int(torch.isin(tokens, torch.tensor([0, 1])).sum()) > 0
    with pytest.raises(ActcacheError, match="exclude_tokens takes integer token ids"):
        ActivationDataset(small_set, batch_size=4, exclude_tokens=torch.tensor([5.0]))
    with pytest.raises(ActcacheError, match="^exclude_ids takes integer token ids"):  # the parameter, not the flag
        shuffle_set(small_set, out=str(tmp_path / "refused"), exclude_ids=np.array([0.5]))
    with pytest.raises(ActcacheError, match="^exclude_ids takes integer token ids"):
        export_set(small_set, str(tmp_path / "refused-hf"), format="hf", exclude_ids=[True])
    assert cli.main(["shuffle", small_set, "--out", str(tmp_path / "cli"), "--exclude-ids", "5,x"]) == 2
