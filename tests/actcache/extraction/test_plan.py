"""The plan resolves every name once, pins it, and checks everything that needs no weights."""

from __future__ import annotations

import pickle

import pytest

import actcache.extraction.forward
import actcache.extraction.plan
import actcache.inputs.model
import actcache.inputs.sources
from actcache.errors import ActcacheError
from actcache.extraction.plan import make_plan

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _count(monkeypatch, module, name: str, calls: list[str]) -> None:
    real = getattr(module, name)

    def counted(*a, **k):
        calls.append(name)
        return real(*a, **k)

    monkeypatch.setattr(module, name, counted)


def test_names_are_resolved_per_plan_never_per_shard(base_config, monkeypatch):
    """A run of 8 shards resolves model and dataset as often as a run of 4: once per request (the flow takes the
    API's plan)."""
    import actcache

    counts = {}
    for n_shards in (4, 8):
        calls: list[str] = []
        with monkeypatch.context() as m:
            for module in (actcache.inputs.model, actcache.extraction.plan):
                _count(m, module, "resolve_model", calls)
            for module in (actcache.inputs.sources, actcache.extraction.plan):
                _count(m, module, "open_source", calls)
            cfg = base_config.replace(max_tokens=128 * n_shards, store=f"{base_config.store}-{n_shards}")
            actcache.extract(cfg, hook="blocks.1.hook_resid_post,blocks.2.attn.hook_z")
        counts[n_shards] = sorted(calls)
    assert counts[4] == counts[8] == ["open_source", "resolve_model"]


def test_plan_pins_what_it_resolved_and_travels_small(base_config):
    plan = make_plan(base_config.replace(hook="blocks.1.hook_resid_post,blocks.2.attn.hook_z"), load_model=False)
    r = plan.resolved
    assert r.model.fingerprint.startswith("local:") and r.dataset.fingerprint.startswith("files:")
    assert {h: (k.engine, k.shape) for h, k in r.hooks.items()} == {
        "blocks.1.hook_resid_post": ("hf-sdpa", (32,)),
        "blocks.2.attn.hook_z": ("bridge", (4, 8)),
    }
    assert [s.key.forward for s in plan.sets] == ["hf-sdpa", "bridge"]
    assert (r.bos_id, r.separator_id) == (0, 0)
    blob = pickle.dumps(plan)
    assert len(blob) < 8000, "no tokenizer or model travels with the plan"
    assert pickle.loads(blob).sets == plan.sets
    assert plan.pinned_config == plan.config  # a local model and files: nothing to pin beyond the fingerprints


@pytest.mark.parametrize(
    "hook,expected",
    [
        ("blocks.99.hook_nope", "layer 99 in hook 'blocks.99.hook_nope' is out of range: "),
        ("blocks.1.hook_mlp_outt", "unknown hook 'blocks.1.hook_mlp_outt'; did you mean blocks.1.hook_mlp_out"),
        ("blocks.1.attn.hook_pattern", "not one vector per token"),
    ],
)
def test_a_bad_hook_fails_in_the_fanout_parent_and_a_partition_before_any_weight(
    base_config, monkeypatch, hook, expected
):
    from actcache.flows.extract import extract_activations
    from actcache.flows.fanout import extract_fanout

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded for a hook that cannot work")

    monkeypatch.setattr(actcache.inputs.model, "load_bridge", no_weights)
    monkeypatch.setattr(actcache.extraction.forward, "load_hf_stack", no_weights)
    cfg = base_config.replace(hook=hook)
    runs = [
        extract_fanout(cfg, num_partitions=2, deployment="no-such/deployment", return_state=True),
        extract_activations(cfg, partition_index=1, num_partitions=2, return_state=True),
    ]
    for state in runs:
        assert state.is_failed()
        with pytest.raises(ActcacheError) as e:
            state.result()
        msg = str(e.value)
        assert expected in msg and ("did you mean" in msg or "per-token hook" in msg), msg
        assert "\n" not in msg and "--" not in msg and e.value.fields == ["hook"]


def test_a_layer_pattern_plans_one_set_per_block_as_if_listed(base_config):
    """blocks.*.X (every block) and blocks.A:B.X (a slice of them), for crosscoders and cross-layer transcoders:
    the plan writes them out, and each set is the one the listed hook names give (the same key)."""
    pattern = make_plan(base_config.replace(hook="blocks.*.hook_mlp_out,blocks.-2:.attn.hook_z"), load_model=False)
    listed = (
        "blocks.0.hook_mlp_out,blocks.1.hook_mlp_out,blocks.2.hook_mlp_out,blocks.1.attn.hook_z,blocks.2.attn.hook_z"
    )
    plan = make_plan(base_config.replace(hook=listed), load_model=False)
    assert pattern.config.hooks == plan.config.hooks == tuple(listed.split(","))
    assert [s.key for s in pattern.sets] == [s.key for s in plan.sets]


@pytest.mark.parametrize(
    ("hook", "message"),
    [
        ("blocks.x.hook_mlp_out", "'x' is not a layer, * (every layer) or a slice such as 2:6 or -4:"),
        ("blocks.3:.hook_mlp_out", "'3:' selects none of the 3 layers of"),
        ("blocks.1:5.hook_mlp_out", "'1:5' is out of range for the 3 layers of"),  # no clamping, as --heads
        ("blocks.*.hook_mlp_outt", "unknown hook 'blocks.0.hook_mlp_outt'; did you mean blocks.0.hook_mlp_out"),
    ],
)
def test_a_bad_layer_pattern_is_one_line(base_config, hook, message):
    with pytest.raises(ActcacheError) as e:
        make_plan(base_config.replace(hook=hook), load_model=False)
    assert message in str(e.value) and "\n" not in str(e.value)
