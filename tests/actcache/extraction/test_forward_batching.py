"""Batching: each batch lands cast in its destination, and an out-of-memory error on the device halves the batch
without losing the shard (simulated: no GPU here, the engine's capture raises torch's out-of-memory error)."""

from __future__ import annotations

import pytest
import torch

from actcache.errors import ActcacheError
from actcache.extraction import forward
from actcache.extraction.forward import HFExtractor, load_hf_stack
from actcache.inputs.model import ModelSpec, resolve_model


class Fake(forward._Batched):
    """An engine whose forward pass is a fixed function of the tokens and runs out of memory above ``fits``."""

    model = torch.nn.Linear(1, 1)  # one model per process, as the engines' loaders keep it

    def __init__(self, fits: int, batch_size: int = 0, d: int = 6):
        self._setup(self.model, ["h"], batch_size, None)
        self.adaptive = True  # as on CUDA
        self.fits, self.d, self.sizes, self.failures = fits, d, [], 0

    def _capture(self, tokens):
        self.sizes.append(len(tokens))
        if len(tokens) > self.fits:
            held = torch.ones(1 << 16)  # what a failed pass allocated; the exception's frames hold it  # noqa: F841
            self.failures += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"h": reference(tokens, self.d)}


def reference(tokens, d):
    return torch.sin(tokens.float()[..., None] * torch.arange(1, d + 1) / 7)


@pytest.fixture(autouse=True)
def _forget_sizes():
    forward._FITS.clear()
    yield
    forward._FITS.clear()


def _tokens(n=37, t=5):
    return torch.arange(n * t, dtype=torch.int32).reshape(n, t)


def test_out_of_memory_halves_the_batch_and_loses_nothing():
    tokens = _tokens()
    eng = Fake(fits=5)
    got = eng(tokens)["h"]
    torch.testing.assert_close(got, reference(tokens, eng.d), rtol=0, atol=0)
    # 37 sequences fit in one automatic pass (2^16 tokens): 37, 18, 9 fail; then 4s to the end of the shard.
    assert eng.sizes[:4] == [37, 18, 9, 4] and eng.failures == 3 and sum(eng.sizes[3:]) == 37
    # Found once per process: the next shard starts at the size that fit, and fails no more.
    eng2 = Fake(fits=5)
    torch.testing.assert_close(eng2(tokens)["h"], reference(tokens, eng2.d), rtol=0, atol=0)
    assert eng2.failures == 0 and set(eng2.sizes) == {4, 1}


def test_a_later_out_of_memory_mid_shard_keeps_the_rows_already_done():
    tokens = _tokens(48)
    eng = Fake(fits=100, batch_size=16)
    calls = 0
    real = eng._capture

    def squeezed(batch):  # another process takes memory after two passes
        nonlocal calls
        calls += 1
        if calls > 2:
            eng.fits = 3
        return real(batch)

    eng._capture = squeezed
    got = eng(tokens)["h"]
    torch.testing.assert_close(got, reference(tokens, eng.d), rtol=0, atol=0)
    assert eng.sizes == [16, 16, 16, 8, 4] + [2] * 8  # 32 rows kept; the last 16 at the size that fits


def test_out_of_memory_at_one_sequence_is_one_line():
    with pytest.raises(ActcacheError, match="does not fit .* even one sequence of 5 tokens.*--context-size"):
        Fake(fits=0)(_tokens(3))


def test_without_a_device_to_adapt_to_the_error_is_not_caught():
    eng = Fake(fits=2, batch_size=4)
    eng.adaptive = False  # CPU: running out of memory there is the OS's business
    with pytest.raises(torch.OutOfMemoryError):
        eng(_tokens(8))


def test_automatic_batch_size_on_cpu_is_fixed():
    eng = Fake(fits=100)
    eng.adaptive = False
    eng(_tokens(20))
    assert eng.sizes == [forward.CPU_BATCH, forward.CPU_BATCH, 20 - 2 * forward.CPU_BATCH]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_batches_land_cast_in_the_destination(tiny_models, dtype):
    """A shard file's view in the storage dtype gets each batch as it completes: the float32 result, cast."""
    model = resolve_model(ModelSpec(str(tiny_models["gpt2"])))
    step = HFExtractor(load_hf_stack(model, 2), "blocks.1.hook_resid_post", batch_size=3)
    tokens = torch.randint(1, 500, (7, 16), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    full = step(tokens)["blocks.1.hook_resid_post"]
    made = {}

    def into(hook, shape):
        made[hook] = torch.full(shape, float("nan"), dtype=dtype)
        return made[hook]

    out = step(tokens, into=into)
    assert out["blocks.1.hook_resid_post"] is made["blocks.1.hook_resid_post"]
    assert full.dtype == torch.float32 and torch.equal(made["blocks.1.hook_resid_post"], full.to(dtype))


@pytest.mark.parametrize("model_inf", [False, True])
def test_finiteness_before_the_cast_is_reported(model_inf):
    """float16 turns 1e5 into Inf: the report tells that overflow apart from an Inf the model produced."""

    class Loud(Fake):
        def _capture(self, tokens):
            out = reference(tokens, self.d) * 1e5 + 1e5  # finite in float32, Inf in float16
            if model_inf:
                out[tokens[:, 0] == 5 * 6] = float("inf")  # one sequence of the third batch, as computed
            return {"h": out}

    seen: dict[str, bool] = {}
    out = Loud(fits=100, batch_size=4)(
        _tokens(11), into=lambda h, shape: torch.empty(shape, dtype=torch.float16), finite=seen
    )
    assert torch.isinf(out["h"]).any() and seen == {"h": not model_inf}
