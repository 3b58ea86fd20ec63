from __future__ import annotations

import hashlib

import pytest
import torch

from actcache.format import shard


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "activations": torch.randn(3, 8, 16, generator=g).half(),
        "tokens": torch.randint(0, 100, (3, 8), generator=g, dtype=torch.int32),
    }


@pytest.mark.parametrize(
    "codec,level", [("none", 0), ("zstd", 1), ("zstd", 3), ("shuffle-zstd", 1), ("shuffle-zstd", 3)]
)
def test_round_trip_and_reproducible_bytes(codec, level):
    meta = {"set_id": "abc", "hook": "blocks.0.hook_resid_post", "index": "7"}
    a = shard.encode(_tensors(), codec=codec, level=level, metadata=meta)
    b = shard.encode(_tensors(), codec=codec, level=level, metadata=dict(reversed(meta.items())))
    assert a.data == b.data and a.sha256 == hashlib.sha256(a.data).hexdigest()
    out = shard.decode(
        a.data, codec=codec, expect={"activations": (torch.float16, (3, 8, 16)), "tokens": (torch.int32, (3, 8))}
    )
    for k, v in _tensors().items():
        assert torch.equal(out[k], v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_shuffle_is_a_byte_transpose_that_leaves_the_header_readable(dtype):
    import numpy as np
    import zstandard

    tensors = {**_tensors(), "activations": _tensors()["activations"].to(dtype)}
    raw = shard.encode(tensors).data
    enc = shard.encode(tensors, codec="shuffle-zstd", level=3)
    shuffled = zstandard.ZstdDecompressor().decompress(enc.data)
    start = 8 + int.from_bytes(raw[:8], "little")
    assert shuffled[:start] == raw[:start] and shuffled != raw  # header as is, tensor data transposed
    size = dtype.itemsize
    body = np.frombuffer(shuffled, np.uint8, offset=start)
    n = len(body) // size * size
    # The recipe in shard.py's docstring, with numpy alone, gives back the plain safetensors file.
    assert shuffled[:start] + body[:n].reshape(size, -1).T.tobytes() + body[n:].tobytes() == raw
    assert torch.equal(shard.decode(enc.data, codec="shuffle-zstd")["activations"], tensors["activations"])


def test_shuffle_zstd_is_smaller_than_zstd_on_smooth_activations():
    x = torch.linspace(-3, 3, 64 * 256).reshape(64, 256).sin().half()  # shared exponents, noisy low bytes
    tensors = {"activations": x + 1e-3 * torch.randn(64, 256).half(), "tokens": torch.zeros(64, dtype=torch.int32)}
    assert len(shard.encode(tensors, codec="shuffle-zstd", level=3).data) < len(
        shard.encode(tensors, codec="zstd", level=3).data
    )


def test_malformed_shuffled_shards_are_value_errors():
    import zstandard

    good = shard.encode(_tensors(), codec="shuffle-zstd", level=1).data
    plain = zstandard.ZstdDecompressor().decompress(good)
    for bad in (b"\x00" * 4, (10**9).to_bytes(8, "little") + plain[8:], plain[:8] + b"[" + plain[9:]):
        with pytest.raises(ValueError):
            shard.decode(zstandard.ZstdCompressor().compress(bad), codec="shuffle-zstd")


def test_decode_checks_names_dtypes_and_shapes():
    data = shard.encode(_tensors()).data
    with pytest.raises(ValueError, match="expected"):
        shard.decode(data, codec="none", expect={"activations": (torch.float32, None)})
    with pytest.raises(ValueError, match="expected"):
        shard.decode(data, codec="none", expect={"tokens": (torch.int32, (4, 8))})
    with pytest.raises(ValueError, match="no tensor"):
        shard.decode(data, codec="none", expect={"acts": (torch.float16, None)})
    with pytest.raises(ValueError, match="invalid offset"):
        shard.decode(data[:-10], codec="none")  # offsets are validated as safetensors does


def test_stats_count_nan_and_inf():
    x = torch.ones(2, 3, 4)
    x[0, 0, 0] = float("nan")
    x[1, 2, 3] = float("inf")
    s = shard.stats(x)
    assert s["nan"] == 1 and s["inf"] == 1
    assert s["mean_l2_norm"] == pytest.approx((4 * 2.0 + 2 * 3**0.5) / 6, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fast_stats_equal_the_elementwise_count(dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 16, 32, generator=g) * 5).to(dtype)
    flat = x.reshape(-1, 32).float()
    want = torch.linalg.vector_norm(flat, dim=-1).mean()
    s = shard.stats(x)
    assert s["nan"] == 0 and s["inf"] == 0 and s["mean_l2_norm"] == pytest.approx(float(want), rel=1e-6)
    x[1, 2, 3] = float("nan")
    assert shard.stats(x)["nan"] == 1


# -- issue 12 --------------------------------------------------------------------------------------------------
def test_stats_stay_finite_json_when_float32_norms_overflow():
    import json

    x = torch.full((2, 3, 8), 3e19)  # finite in float32, but its squares are not
    s = shard.stats(x)
    assert s["nan"] == 0 and s["inf"] == 0 and s["mean_l2_norm"] == pytest.approx(3e19 * 8**0.5, rel=1e-6)
    json.dumps(s, allow_nan=False)
    x[0, 0, 0] = float("inf")
    assert shard.stats(x)["inf"] == 1 and json.dumps(shard.stats(x), allow_nan=False)


@pytest.mark.parametrize("codec", ["none", "zstd", "shuffle-zstd"])
def test_header_is_checked_before_the_data(codec):
    data = shard.encode(_tensors(), codec=codec, level=1).data
    good = {"activations": (torch.float16, (3, 8, 16)), "tokens": (torch.int32, (3, 8))}
    shard.check_header(data, codec=codec, expect=good)
    for name, bad in {
        "d": {**good, "activations": (torch.float16, (3, 8, 1 << 30))},
        "n_seq": {**good, "tokens": (torch.int32, (2, 8))},
        "dtype": {**good, "activations": (torch.bfloat16, (3, 8, 16))},
        "missing": {**good, "extra": (torch.int32, (1,))},
    }.items():
        for check in (shard.check_header, shard.decode):
            with pytest.raises(ValueError, match="expected|no tensor"):
                check(data, codec=codec, expect=bad)
        assert name


@pytest.mark.parametrize("with_shapes", [True, False])
def test_a_shard_inflating_past_its_bound_is_refused_and_one_within_it_is_read(with_shapes, monkeypatch):
    """Up to ``FREE_INFLATION`` any ratio is read (a small set of repeated text compresses well); above it, at most
    ``MAX_INFLATION`` times the stored size, with or without the shapes a set's manifest gives (load_examples
    decodes without), and the environment variable raises the bound."""
    monkeypatch.setattr(shard, "FREE_INFLATION", 1 << 20)
    zeros = {
        "activations": torch.zeros(4, 64, 2048, dtype=torch.float16),
        "tokens": torch.zeros(4, 64, dtype=torch.int32),
    }
    expect = {"activations": (torch.float16, (4, 64, 2048)), "tokens": (torch.int32, (4, 64))} if with_shapes else None
    bomb = shard.encode(zeros, codec="zstd", level=1).data  # 1 MiB of zeros in a few hundred bytes
    assert len(bomb) * shard.MAX_INFLATION < 1 << 20
    with pytest.raises(ValueError, match=r"zstd frame of \d+ bytes inflates to \d+ bytes.*decompression bomb"):
        shard.decode(bomb, codec="zstd", expect=expect)
    monkeypatch.setenv("ACTCACHE_MAX_INFLATION", "100000")
    assert torch.equal(shard.decode(bomb, codec="zstd", expect=expect)["activations"], zeros["activations"])
    monkeypatch.delenv("ACTCACHE_MAX_INFLATION")
    small = {
        "activations": zeros["activations"][:, :8, :64].contiguous(),
        "tokens": zeros["tokens"][:, :8].contiguous(),
    }
    small_expect = (
        {"activations": (torch.float16, (4, 8, 64)), "tokens": (torch.int32, (4, 8))} if with_shapes else None
    )
    out = shard.decode(shard.encode(small, codec="zstd").data, codec="zstd", expect=small_expect)
    assert torch.equal(out["activations"], small["activations"])  # under FREE_INFLATION: any ratio


def test_decoding_read_only_bytes_warns_nothing_and_leaves_them_as_they_were():
    """torch.frombuffer warned "The given buffer is not writable" for bytes (an object store's, or ``read_bytes``'):
    the tensors get a writable buffer of their own, and writing to them never changes the bytes read."""
    import warnings

    data = shard.encode({"tokens": torch.arange(12, dtype=torch.int32).view(3, 4)}).data
    before = bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = shard.decode(data, codec="none", expect={"tokens": (torch.int32, (3, 4))})["tokens"]
    t[0, 0] = 99
    assert data == before and t[0, 0] == 99 and t[1].tolist() == [4, 5, 6, 7]


def test_a_tensor_of_read_only_bytes_copies_only_its_own_and_warns_nothing():
    """``read_tokens`` makes tensors of ranged reads (bytes): each gets a writable copy of its own bytes."""
    import warnings

    data = bytes(range(16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = shard.tensor(data, torch.uint8, [2, 3], offset=4)
    t[0, 0] = 99
    assert t.tolist() == [[99, 5, 6], [7, 8, 9]] and data == bytes(range(16))


@pytest.mark.subprocess
def test_views_of_a_read_only_shard_warn_nothing():
    """A shard read whole is bytes (read-only): torch's warning about read-only buffers is not shown to a user
    reading a set, even where actcache was imported inside ``catch_warnings`` (as pytest imports it), which drops
    the filters set at import. A fresh process: torch warns once per process."""
    import subprocess
    import sys

    code = (
        "import warnings, torch; from safetensors.torch import save\n"
        "with warnings.catch_warnings():\n"
        "    from actcache.format import shard\n"
        "data = save({'activations': torch.arange(12.0).view(4, 3)})\n"
        "assert shard.views(data)['activations'][3, 2].item() == 11.0\n"
        "assert shard.views(bytearray(data))['activations'].sum().item() == 66.0\n"
    )
    run = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stderr == "", run.stderr[-2000:]
