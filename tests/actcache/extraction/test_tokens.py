from __future__ import annotations

import pytest

from actcache.extraction.tokens import ShardRange, ShardWork, TokenCache, pack
from actcache.format.key import TokensKey
from actcache.storage.store import Store


def test_pack_concatenates_with_separator_and_cuts_exact_lengths():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    assert list(pack(docs, context_size=4, bos=100, separator=0, prepend_bos=True)) == [
        [100, 1, 2, 3],
        [100, 0, 4, 5],
        [100, 0, 6, 7],
        [100, 8, 9, 0],
    ]
    assert list(pack(docs, context_size=3, bos=None, separator=None, prepend_bos=False)) == [
        [1, 2, 3],
        [4, 5, 6],
        [7, 8, 9],
    ]


def test_pack_is_the_naive_reference_on_long_input():
    import random

    rng = random.Random(0)
    docs = [[rng.randrange(1, 50) for _ in range(rng.randrange(0, 300))] for _ in range(500)]
    flat = [t for d in docs for t in [*d, 0]]
    expected = [[99, *flat[i : i + 63]] for i in range(0, len(flat) - 62, 63)]
    assert list(pack(docs, context_size=64, bos=99, separator=0, prepend_bos=True)) == expected


@pytest.mark.parametrize("total,per", [(10, 4), (8, 4), (0, 4), (1, 1), (7, 10)])
def test_shard_range_is_the_list_of_full_shards_and_a_partial_last(total, per):
    full, rest = divmod(total, per)
    naive = [ShardWork(i, per) for i in range(full)] + ([ShardWork(full, rest)] if rest else [])
    r = ShardRange(total, per)
    assert list(r) == naive and len(r) == len(naive) and r[:] == naive and r[1::2] == naive[1::2]
    assert [r[i] for i in range(-len(r), 0)] == naive
    assert all(w in r for w in naive) and ShardWork(len(naive), per) not in r and ShardWork(0, per + 1) not in r
    with pytest.raises(IndexError):
        r[len(naive)]


def test_shard_range_of_an_enormous_target_costs_nothing():
    r = ShardRange(10**18, 3, known=False)
    assert len(r) == -(-(10**18) // 3) and r[-1] == ShardWork(len(r) - 1, 1) and ShardWork(10**15, 3) in r


class _Tok:
    """A character tokenizer: enough to test caching without a model."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


@pytest.fixture
def cache(tmp_path):
    key = TokensKey(
        dataset="d",
        tokenizer="chars",
        text_column="text",
        context_size=8,
        prepend_bos=False,
        separator=10,
        seqs_per_shard=3,
    )
    return TokenCache(Store(str(tmp_path)), key)


def test_cache_writes_then_reuses_and_extends(cache):
    texts = [f"document number {i}" for i in range(20)]  # 20 * 19 chars = 47 sequences of 8
    consumed = []

    def source():
        for t in texts:
            consumed.append(t)
            yield t

    work = cache.ensure(7, source, _Tok(), sep=10, bos=None)
    assert [(w.index, w.n_seq) for w in work] == [(0, 3), (1, 3), (2, 1)]
    first = cache.load(0, 3)
    assert first.shape == (3, 8) and "".join(map(chr, first[0].tolist())) == "document"

    consumed.clear()
    assert cache.ensure(7, source, _Tok(), sep=10, bos=None) == work
    assert consumed == [], "a complete token cache is not re-tokenized"

    work = cache.ensure(100, source, _Tok(), sep=10, bos=None)  # more than the data holds
    total = (sum(len(t) + 1 for t in texts)) // 8
    assert sum(w.n_seq for w in work) == total
    assert cache.plan(100) == work, "the end of the data is remembered"
    assert (cache.load(0, 3) == first).all()
