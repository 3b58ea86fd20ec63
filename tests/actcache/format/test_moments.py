"""Per-shard moments against a float64 reference; exact, ordered merges; the carried prefix state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from actcache.format import moments
from actcache.format.records import Record


def reference(x: torch.Tensor) -> dict:
    """The slow way: everything in float64 over all finite rows at once."""
    a = x.reshape(-1, x.shape[-1]).double().numpy()
    ok = np.isfinite(a).all(axis=1)
    f = a[ok]
    norms = np.sqrt((f * f).sum(axis=1))
    return {
        "n": int(ok.sum()),
        "mean": f.mean(axis=0),
        "var": f.var(axis=0),
        "mean_norm": norms.mean(),
        "mean_sq_norm": (norms**2).mean(),
        "nan": int(np.isnan(a).sum()),
        "inf": int(np.isinf(a).sum()),
    }


def check(st: dict, ref: dict, rtol: float = 1e-6) -> None:
    assert st["n"] == ref["n"] and st["nan"] == ref["nan"] and st["inf"] == ref["inf"]
    np.testing.assert_allclose(st["mean"], ref["mean"], rtol=rtol, atol=1e-9)
    np.testing.assert_allclose(st["var"], ref["var"], rtol=rtol)
    assert st["mean_norm"] == pytest.approx(ref["mean_norm"], rel=rtol)
    assert st["mean_sq_norm"] == pytest.approx(ref["mean_sq_norm"], rel=rtol)
    assert st["scale"] == pytest.approx(np.sqrt(len(ref["mean"])) / ref["mean_norm"], rel=rtol)


def acts(seed: int, shape=(6, 32, 48), dtype=torch.float16, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.1, 30, shape[-1])  # dimensions of very different spread and a large common offset
    return (torch.randn(*shape, generator=g) * scale + offset).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_one_shard_matches_the_float64_reference(dtype, monkeypatch):
    monkeypatch.setattr(moments, "_CHUNK_ELEMENTS", 48 * 7)  # many chunks of 7 rows, the last one short
    x = acts(0, dtype=dtype, offset=1000.0)
    check(moments.of(x).stats(), reference(x))


def test_shards_merged_in_order_equal_the_whole(monkeypatch):
    parts = [acts(i, shape=(n, 32, 48)) for i, n in enumerate((4, 4, 1, 4))]
    total = moments.Moments.empty(48)
    for p in parts:
        total = total.merge(moments.of(p))
    check(total.stats(), reference(torch.cat(parts)))
    again = moments.Moments.empty(48)
    for p in parts:
        again = again.merge(moments.of(p))
    assert json.dumps(again.stats()) == json.dumps(total.stats())


def test_non_finite_rows_are_counted_not_averaged():
    x = acts(1).float()
    x[0, 3, 5] = float("nan")
    x[2, 7, :3] = float("inf")
    x[4, 1, 0] = float("-inf")
    st = moments.of(x).stats()
    assert (st["n"], st["nan"], st["inf"]) == (6 * 32 - 3, 1, 4)
    check(st, reference(x))
    json.dumps(st, allow_nan=False)


def test_bfloat16_values_whose_squares_overflow_float32_stay_finite():
    x = acts(2, dtype=torch.bfloat16)
    x[1, 2, 0] = 3e38  # finite in bfloat16; its square is not finite in float32
    st = moments.of(x).stats()
    assert st["n"] == 6 * 32 and st["nan"] == st["inf"] == 0
    check(st, reference(x), rtol=1e-5)


def test_all_rows_non_finite_gives_no_numbers():
    st = moments.of(torch.full((2, 3, 4), float("nan"))).stats()
    assert st == {
        "n": 0,
        "mean": None,
        "var": None,
        "mean_norm": None,
        "mean_sq_norm": None,
        "scale": None,
        "nan": 24,
        "inf": 0,
    }


def test_same_bits_whatever_torch_thread_count():
    x = acts(3, shape=(64, 32, 96))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = moments.of(x).to_json()
        torch.set_num_threads(max(2, before))
        many = moments.of(x).to_json()
    finally:
        torch.set_num_threads(before)
    assert one == many


def test_record_round_trip_is_exact():
    m = moments.of(acts(4))
    back = moments.Moments.from_json(json.loads(json.dumps(m.to_json())), 48)
    assert back.to_json() == m.to_json() and np.array_equal(back.m2, m.m2)
    with pytest.raises(ValueError):
        moments.Moments.from_json(m.to_json(), 47)


# -- consolidation: the manifest's stats and the carried prefix state ------------------------------------
def _recs(sizes: list[int]) -> tuple[list[Record], dict[int, moments.Moments]]:
    recs, by_index = [], {}
    for i, n in enumerate(sizes):
        m = moments.of(acts(10 + i, shape=(n, 8, 48)))
        recs.append(
            Record(
                i,
                f"shards/{i:06d}.safetensors",
                n,
                n * 8,
                f"{i:032x}{n:032x}",
                100,
                {moments.RECORD_FIELD: m.to_json()},
            )
        )
        by_index[i] = m
    return recs, by_index


def _merged(recs, previous=None, get=None):
    full = lambda r: r.n_seq == 4  # noqa: E731
    return moments.merged(
        recs,
        48,
        full=full,
        previous=previous,
        moments_of=get or (lambda r: moments.Moments.from_json(r.extra[moments.RECORD_FIELD], 48)),
    )


def test_extension_continues_from_the_prefix_and_reads_only_the_rest():
    recs, _ = _recs([4, 4, 4, 4, 2])
    fresh = _merged(recs)
    assert fresh["moments"]["prefix"]["shards"] == 4  # the partial last shard stays out of the carried state

    first = _merged(recs[:3])
    previous = {"stats": first["stats"], "moments": first["moments"]}
    read = []
    stripped = [moments.without(r) for r in recs[:3]] + recs[3:]  # as the manifest lists them: no vectors

    def get(r):
        read.append(r.index)
        return moments.Moments.from_json(r.extra[moments.RECORD_FIELD], 48)

    extended = _merged(stripped, previous, get)
    assert read == [3, 4]
    assert json.dumps(extended, sort_keys=True) == json.dumps(fresh, sort_keys=True)


def test_unchanged_shards_reuse_the_manifest_without_reading():
    recs, _ = _recs([4, 4, 3])
    fields = _merged(recs)
    again = _merged([moments.without(r) for r in recs], fields, get=lambda r: pytest.fail("read a record"))
    assert again == fields


def test_a_grown_last_shard_is_merged_again():
    recs, _ = _recs([4, 4, 3])
    before = _merged(recs)
    grown, _ = _recs([4, 4, 4])
    assert _merged(grown, before) == _merged(grown)
    assert _merged(grown)["stats"] != before["stats"]


def test_a_shard_without_moments_means_no_stats():
    recs, _ = _recs([4, 4])
    assert _merged(recs, get=lambda r: None if r.index == 1 else moments.Moments.empty(48)) == {}


def test_manifest_entries_leave_the_vectors_out():
    recs, _ = _recs([4])
    entry = moments.without(recs[0]).to_dict()
    assert moments.RECORD_FIELD not in entry["extra"] and moments.RECORD_FIELD in recs[0].extra


def test_a_thousand_shards_at_d4096_keep_the_manifest_small():
    d = 4096
    one = moments.Moments(10, np.linspace(-1, 1, d), np.linspace(1, 2, d), 30.0, 900.0, 0, 0).to_json()
    recs = [
        Record(i, f"shards/{i:06d}.safetensors", 4, 40, f"{i:064x}", 1, {moments.RECORD_FIELD: one})
        for i in range(1000)
    ]
    fields = moments.merged(
        recs,
        d,
        full=lambda r: True,
        previous=None,
        moments_of=lambda r: moments.Moments.from_json(r.extra[moments.RECORD_FIELD], d),
    )
    assert fields["stats"]["n"] == 10_000
    shard_list = json.dumps([moments.without(r).to_dict() for r in recs])
    assert len(json.dumps(fields)) < 400_000 and len(shard_list) < 200_000  # vs ~90 MB with vectors per shard


# -- moments by token group --------------------------------------------------------------------------------
def _shard_with_tokens(seed: int, n_seq: int = 5, ctx: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = acts(seed, shape=(n_seq, ctx, 48))
    x[:, 0] = (x[:, 0].float() * 20).to(x.dtype)  # BOS rows much larger, as in real models
    tokens = torch.randint(3, 50, (n_seq, ctx), generator=g, dtype=torch.int32)
    tokens[torch.rand(n_seq, ctx, generator=g) < 0.2] = 1  # EOS here and there, also at first positions
    tokens[:, 0] = torch.where(torch.arange(n_seq) % 2 == 0, 0, 1).int()
    first = torch.zeros(n_seq, ctx, dtype=torch.bool)
    first[:, 0] = True
    return x, tokens, first


@pytest.mark.parametrize(
    ("exclude", "drop_first"), [((), False), ((), True), ((0,), False), ((0, 1), True), ((1, 2), False)]
)
def test_by_token_gives_the_moments_of_the_rows_kept(exclude, drop_first):
    shards = [_shard_with_tokens(s) for s in (1, 2, 3)]
    total = None
    for x, t, f in shards:
        g = moments.by_token(x, t, f, (0, 1, 2))
        g = moments.ByToken.from_json(json.loads(json.dumps(g.to_json())), 48)
        total = g if total is None else total.merge(g)
    keep = [
        (~torch.isin(t.reshape(-1), torch.tensor(exclude, dtype=torch.int32))) & ~(f.reshape(-1) & drop_first)
        for _, t, f in shards
    ]
    rows = torch.cat([x.reshape(-1, 48)[k] for (x, _, _), k in zip(shards, keep, strict=True)])
    check(total.kept(exclude, drop_first).stats(), reference(rows))
    assert total.kept((7,), drop_first) is None  # an id not tracked: its rows hide among "other"


def test_by_token_is_carried_in_the_prefix_state_like_the_totals():
    shards = [_shard_with_tokens(s) for s in range(4)]
    recs = [
        Record(
            i,
            f"shards/{i:06d}.safetensors",
            5,
            40,
            f"{i:064x}",
            100,
            {
                moments.RECORD_FIELD: moments.of(x).to_json(),
                moments.BY_TOKEN_FIELD: moments.by_token(x, t, f, (0, 1)).to_json(),
            },
        )
        for i, (x, t, f) in enumerate(shards)
    ]

    def merge(rs, previous=None):
        return moments.merged(
            rs,
            48,
            full=lambda r: True,
            previous=previous,
            moments_of=lambda r: moments.Moments.from_json(r.extra[moments.RECORD_FIELD], 48),
            by_token_of=lambda r: (
                moments.ByToken.from_json(r.extra[moments.BY_TOKEN_FIELD], 48)
                if moments.BY_TOKEN_FIELD in r.extra
                else None
            ),
        )

    fresh = merge(recs)
    extended = merge(recs, previous=merge(recs[:2]))  # a rerun that reads only the last two records
    assert extended["moments"]["by_token"] == fresh["moments"]["by_token"]
    assert fresh["moments"]["prefix"]["by_token"] == fresh["moments"]["by_token"]
    older = Record(*list(vars(recs[3]).values())[:6], {moments.RECORD_FIELD: recs[3].extra[moments.RECORD_FIELD]})
    without = merge([*recs[:3], older])  # a shard written before them: none for the set
    assert "by_token" not in without["moments"] and without["stats"] == fresh["stats"]
