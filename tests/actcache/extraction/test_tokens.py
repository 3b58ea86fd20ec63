from __future__ import annotations

import warnings

import pytest

from actcache.extraction.tokens import Part, ShardRange, ShardWork, TokenCache, pack
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


def test_a_document_with_no_token_is_skipped_as_a_missing_one():
    """A text that tokenizes to nothing packs as an empty --token-column list does (and a missing text): no
    separator; a document cut into parts is one document, its separator after its last part."""
    kw = dict(context_size=3, bos=None, separator=0, prepend_bos=False)
    assert list(pack([[1, 2], [], [3, 4], [], [], [5]], **kw)) == list(pack([[1, 2], [3, 4], [5]], **kw))
    assert list(pack([[1, 2], [], [3, 4], [5]], **kw)) == [[1, 2, 0], [3, 4, 0]]
    parts = [Part([1]), Part([]), [2], Part([]), [], [3, 4]]  # [1, 2]; nothing; [3, 4]
    assert list(pack(parts, **kw)) == [[1, 2, 0], [3, 4, 0]]


def test_pack_is_the_naive_reference_on_long_input():
    import random

    rng = random.Random(0)
    docs = [[rng.randrange(1, 50) for _ in range(rng.randrange(0, 300))] for _ in range(500)]
    flat = [t for d in docs if d for t in [*d, 0]]  # a document with no token adds no separator either
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
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "The given buffer is not writable": read-only bytes were wrapped
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


def _sentencepiece_like(lines: list[str]):
    """A Metaspace BPE (Llama/SentencePiece style: spaces become ▁, one prepended at the start of the text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def _no_pre_tokenizer(lines: list[str]):
    """A BPE over the whole text as one word: merges may span spaces (the hardest case for windows)."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.fixture(scope="module")
def long_text() -> str:
    """Realistic prose (Python's help topics) with what cuts badly: CJK and emoji (several bytes each, tokens
    inside a character), runs of spaces and newlines, and a 5000-character word with no space."""
    import random

    from actcache.inputs.demo import corpus_lines

    rng = random.Random(0)
    odd = ["日本語のテキストと絵文字 🙂🚀 ", " " * 37, "\n\n\n\t", "x" * 5000, "aGVsbG8gd29ybGQ=" * 300]
    parts, n = [], 0
    for ln in corpus_lines():
        parts.append(ln + (" " if rng.random() < 0.8 else rng.choice(odd)))
        n += len(parts[-1])
        if n > 450_000:
            break
    return "".join(parts)


@pytest.mark.parametrize("which", ["demo", "gpt2", "llama", "neox", "sentencepiece-like", "no pre-tokenizer"])
@pytest.mark.parametrize("window", [4096, 1 << 17])
def test_a_long_document_in_windows_gives_the_one_call_token_ids(which, window, long_text, tiny_models, monkeypatch):
    """Tokenizing a long document window by window gives exactly the ids of one call, for every tokenizer the
    tests and the demo build and for tokenizers whose pieces reach across spaces; and ``pack`` of its parts puts
    the separator only after the document's end."""
    from transformers import AutoTokenizer

    from actcache.extraction import tokens
    from actcache.inputs.demo import corpus_lines, train_tokenizer

    lines = corpus_lines()[:2000]
    tok = {
        "demo": lambda: train_tokenizer(lines),
        "sentencepiece-like": lambda: _sentencepiece_like(lines),
        "no pre-tokenizer": lambda: _no_pre_tokenizer(lines),
    }.get(which, lambda: AutoTokenizer.from_pretrained(tiny_models[which]))()
    monkeypatch.setattr(tokens, "WINDOW_CHARS", window)
    monkeypatch.setattr(tokens, "OVERLAP_CHARS", min(tokens.OVERLAP_CHARS, window // 4))
    one_call = tok(long_text, add_special_tokens=False)["input_ids"]
    assert len(long_text) > 3 * window
    calls = []
    encode = tokens._encode
    monkeypatch.setattr(tokens, "_encode", lambda t, chunk: calls.append(max(map(len, chunk))) or encode(t, chunk))
    parts = list(tokens.tokenize_docs(["short one", long_text, "after"], tok, whole=False))
    assert all(isinstance(p, tokens.Part) for p in parts[1:-2]) and not isinstance(parts[-2], tokens.Part)
    assert [i for p in parts[1:-1] for i in p] == one_call
    assert list(tokens.tokenize_docs([long_text], tok)) == [one_call]
    assert max(calls) < 10, "the long document went to the tokenizer in one call"
    sep = 999_999
    packed = [i for s in pack(parts, context_size=7, bos=None, separator=sep, prepend_bos=False) for i in s]
    whole = [*tok("short one")["input_ids"], sep, *one_call, sep, *tok("after")["input_ids"], sep]
    assert packed == whole[: len(packed)] and len(whole) - len(packed) < 7


_PACK_20MB = """
import resource, sys
from transformers import AutoTokenizer
from actcache.extraction.tokens import pack, tokenize_docs

tok = AutoTokenizer.from_pretrained(sys.argv[1])
lines = [ln for ln in open(sys.argv[2], encoding="utf-8").read().split("\\n") if ln]
texts = [" ".join(lines)] if sys.argv[3] == "one line" else lines
del lines
n = sum(1 for _ in pack(tokenize_docs(texts, tok, whole=False), context_size=128, bos=0, separator=0, prepend_bos=True))
print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_20_mb_line_costs_no_more_memory_than_the_same_text_in_short_lines(tiny_models, tmp_path):
    """The issue's case: one 20 MB document (it cost 3.1 GB, against 0.5 GB for the same text in lines), tokenized
    and packed the way the token cache does it, peaks within 1.5 times the same text as ordinary documents."""
    import subprocess
    import sys

    from actcache.inputs.demo import corpus_lines

    text, lines = tmp_path / "corpus.txt", corpus_lines()
    with text.open("w", encoding="utf-8") as f:
        size = 0
        while size < 20 << 20:
            for ln in lines:
                size += f.write(ln + "\n")
    peaks = {}
    for shape in ("lines", "one line"):
        out = subprocess.run(
            [sys.executable, "-c", _PACK_20MB, str(tiny_models["gpt2"]), str(text), shape],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        ).stdout.split()
        peaks[shape] = int(out[1])
        assert int(out[0]) > 20_000  # sequences of 128 tokens: the whole text went through
    assert peaks["one line"] < 1.5 * peaks["lines"], peaks


def test_a_token_shard_with_ids_outside_the_vocabulary_is_damage_and_a_rerun_rebuilds_it(make_config, tmp_path):
    """A token cache whose record vouches for ids the tokenizer never makes (forged, or foreign) was a raw
    IndexError in the forward pass, with "rerun to resume" that failed again. It is one line naming the shard and
    the id, and the rerun rebuilds it, byte for byte."""
    import hashlib
    import json

    from setwriter import extract_by_stages

    from actcache.errors import Failure
    from actcache.format import records, shard

    extract_by_stages(make_config(store=str(tmp_path)))
    (root,) = (tmp_path / "_tokens").iterdir()
    rec_path = root / "done" / "000000.json"
    rec = json.loads(rec_path.read_text())
    good = (root / rec["file"]).read_bytes()
    t = shard.decode(good, codec="none")["tokens"].clone()
    t[0, 5] = 1_000_000
    data = shard.encode({"tokens": t}).data
    (root / rec["file"]).write_bytes(data)
    rec.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    rec_path.write_text(json.dumps(records.sealed(rec)))  # the forgery resealed: only the ids tell
    index = json.loads((root / "index.json").read_text())
    index["shards"][0] = rec
    (root / "index.json").write_text(json.dumps(records.sealed(index)))
    other = make_config(store=str(tmp_path), hook="blocks.2.hook_resid_post")
    with pytest.raises(
        Failure, match=r"token shard 0 .* \(it holds token id 1000000, outside the tokenizer's 0\.\.\d+\)"
    ):
        extract_by_stages(other)
    extract_by_stages(other)
    assert (root / rec["file"]).read_bytes() == good
