"""Run the model just far enough to fill the requested hooks, in batches, under ``torch.inference_mode``.

Two engines fill hooks; both stop the forward pass by raising once every requested hook fired, so
later blocks, the final norm and the unembedding never run. Several hooks share one pass.

- ``hf-sdpa`` (``HFExtractor``): the plain HF model, loaded with only the blocks it needs and its default
  (sdpa) attention, with PyTorch forward hooks on its decoder layers. It serves the residual stream
  between blocks (``blocks.L.hook_resid_pre/hook_resid_post`` and their aliases ``hook_in/hook_out``) of
  the architectures in ``FAST_MODEL_TYPES``: what SAEs are trained on, at the speed of the bare model.
- ``bridge`` (``Extractor``): TransformerLens' bridge, for every other hook (attention internals, MLP
  internals, norms). It forces eager attention and wraps every module, which costs ~20% on CPU.

The engines agree to fp32 rounding, not bit for bit (sdpa vs the bridge's own attention), so the engine
a hook gets is part of its set's key (``SetKey.forward``); ``forward_engine`` decides it from the hook
name and the model's config alone, so a complete set is still recognised without loading weights.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from actcache import progress

if TYPE_CHECKING:
    from actcache.extraction.selection import Selection
from actcache.errors import ActcacheError, opt
from actcache.extraction.engines import _RESID, BRIDGE, FAST_MODEL_TYPES, HF_SDPA, forward_engine  # noqa: F401 (re-exported)
from actcache.inputs import gates

log = logging.getLogger(__name__)


class _Reached(Exception):
    """Raised from a hook to end the forward pass once every activation is captured."""


def pick_device(device: str) -> str:
    """The torch device for ``device`` (auto: cuda when available), checked to exist on this machine."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ActcacheError(f"{opt('device')} {device!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ActcacheError(
                f"{opt('device')} {device}: CUDA is not available here (torch {torch.__version__}); "
                f"use {opt('device', 'cpu')} or auto"
            )
        if dev.index is not None and dev.index >= count:
            raise ActcacheError(
                f"{opt('device')} {device}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
            )
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ActcacheError(f"{opt('device')} {device}: MPS is not available here; use {opt('device', 'cpu')} or auto")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ActcacheError(
            f"{opt('device')} {device}: unsupported device type {dev.type!r}; use auto, cpu, cuda[:N] or mps"
        )
    return device


CPU_BATCH = 8
"""Sequences per forward pass on CPU when --batch-size is 0 (automatic)."""
AUTO_BATCH_TOKENS = 1 << 16
"""Where the automatic batch size on CUDA starts (tokens per pass): past it a GPU gains nothing but memory use."""
_FITS: dict[tuple, int] = {}
"""(model, hooks, context) -> the batch size known to fit on the device, once a larger one ran out of memory."""


class _Batched:
    """Batching and the device round trip, shared by both engines."""

    device: torch.device
    hooks: list[str]
    batch_size: int
    """Sequences per forward pass; 0: automatic (see ``batch_for``)."""
    out_dtype: torch.dtype | None = None
    adaptive: bool = False
    """Halve the batch and redo it when the device runs out of memory (on CUDA)."""
    _module: Any = None

    def _setup(self, module: Any, hooks: str | Sequence[str], batch_size: int, out_dtype: torch.dtype | None) -> None:
        """What both engines share: the hooks (in order, once each), batching, dtype, the model's device."""
        self.hooks = [hooks] if isinstance(hooks, str) else list(dict.fromkeys(hooks))
        self.batch_size, self.out_dtype = batch_size, out_dtype
        self._module = module
        self.device = next(module.parameters()).device
        self.adaptive = self.device.type == "cuda"

    def _capture(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def capture(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{hook: activations ``[batch, pos, ...]``} of one batch on the device, as computed; ``attention_mask``
        (1 for real tokens, 0 for right padding) is passed to the model (``extraction.examples``)."""
        with torch.inference_mode():
            tokens = tokens.to(self.device, dtype=torch.long)
            mask = None if attention_mask is None else attention_mask.to(self.device, dtype=torch.long)
            return self._checked(self._capture(tokens, mask), tokens)

    def _checked(self, got: dict[str, torch.Tensor], tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        b, t = tokens.shape
        for h in self.hooks:
            act = got.get(h)
            if act is None:
                raise ActcacheError(f"hook {h!r} did not fire during the forward pass; pick another hook")
            if act.dim() < 3 or tuple(act.shape[:2]) != (b, t):
                raise ActcacheError(
                    f"hook {h!r} gives shape {list(act.shape)}, not one vector per token "
                    f"[batch={b}, pos={t}, ...]; pick a per-token hook such as hook_resid_post"
                )
        return got

    def hook_shapes(self) -> dict[str, list[int]]:
        """Per-token shape of each hook's activation (e.g. [d_model] or [n_heads, d_head]).

        Probed twice, with different batch sizes and lengths: a hook is per-token only if its shape is
        [batch, pos, ...] with the same trailing dims both times (one probe alone lets a [batch, heads, q, k]
        attention pattern pass when heads happens to equal the probe's length).
        """
        shapes = []
        with torch.inference_mode():
            for b, t in ((1, 3), (2, 5)):
                probe = torch.zeros((b, t), dtype=torch.long, device=self.device)
                shapes.append({h: list(a.shape[2:]) for h, a in self._checked(self._capture(probe), probe).items()})
        for h in self.hooks:
            if shapes[0][h] != shapes[1][h]:
                raise ActcacheError(
                    f"hook {h!r} is not one vector per token (its shape depends on the sequence "
                    "length); pick a per-token hook such as hook_resid_post"
                )
        return shapes[0]

    def _fits_key(self, context: int) -> tuple:
        return (id(self._module), tuple(self.hooks), context)

    def batch_for(self, n_seq: int, context: int) -> int:
        """Sequences per pass: ``batch_size``, or automatically: on CUDA as many as ``AUTO_BATCH_TOKENS`` allow,
        on CPU ``CPU_BATCH``; never more than what already fit in this process after an out-of-memory error."""
        size = self.batch_size or (max(1, AUTO_BATCH_TOKENS // context) if self.adaptive else CPU_BATCH)
        return max(1, min(size, n_seq, _FITS.get(self._fits_key(context), size)))

    def __call__(
        self,
        tokens: torch.Tensor,
        into: Callable[[str, tuple[int, ...]], torch.Tensor] | None = None,
        finite: dict[str, bool] | None = None,
        select: Mapping[str, Selection] | None = None,
    ) -> dict[str, torch.Tensor]:
        """{hook: activations ``[n_seq, context, d]``} (trailing hook dims flattened into d), on the CPU.

        ``select``: per hook, the heads and dims kept (``--heads``, ``--dims``), taken on the device from each batch
        as computed, so only they cross to the host and into the shard (``d`` is then the kept width).

        Each batch is cast to its destination's dtype as it completes (on the device on CUDA) and written in
        place: into the tensor ``into(hook, shape)`` returns (a shard file's view), or else into a new host
        tensor in ``out_dtype`` (as computed when None). No list of pieces, no cat, no float32 copy of a shard.
        ``finite``, if given, gets {hook: whether the activations as computed, before that cast, were all
        finite}: once cast, an Inf from an overflow of the storage dtype looks like one the model produced.
        """
        cuda = self.device.type == "cuda"
        if cuda and not tokens.is_pinned():
            tokens = tokens.pin_memory()  # so the per-batch uploads below are truly asynchronous
        n_seq, context = tokens.shape
        size = self.batch_for(n_seq, context)
        outs: dict[str, torch.Tensor] = {}
        bad: dict[str, torch.Tensor] = {}  # {hook: 0-d bool on the device}: read once, after the sync below
        start = 0
        with torch.inference_mode():
            while start < n_seq:
                batch = tokens[start : start + size].to(self.device, dtype=torch.long, non_blocking=True)
                out_of_memory = None
                try:
                    got = self._checked(self._capture(batch), batch)
                except torch.OutOfMemoryError as e:
                    if not self.adaptive:
                        raise
                    out_of_memory = str(e).strip().split("\n")[0][:200]  # handled once the exception is gone:
                    # its traceback holds the failed pass's tensors
                if out_of_memory is not None:
                    got = batch = None  # type: ignore[assignment]  # frees them before the retry
                    size = self._smaller(size, context, out_of_memory)
                    continue
                for h, act in got.items():
                    act = act.reshape(act.shape[0], act.shape[1], -1)
                    if select is not None and h in select:
                        act = select[h].apply(act)
                    dest = outs.get(h)
                    if dest is None:
                        shape = (n_seq, *act.shape[1:])
                        # Pinned on CUDA so that the device-to-host copies are asynchronous (no sync per batch).
                        dest = outs[h] = (
                            into(h, shape)
                            if into is not None
                            else torch.empty(shape, dtype=self.out_dtype or act.dtype, pin_memory=cuda)
                        )
                    if finite is not None:
                        nonfinite = ~torch.isfinite(act).all()
                        bad[h] = bad[h] | nonfinite if h in bad else nonfinite
                    if cuda and act.dtype != dest.dtype:
                        act = act.to(dest.dtype)  # cast on the device: fewer bytes over PCIe, same values
                    dest[start : start + len(batch)].copy_(act, non_blocking=cuda)
                start += len(batch)
                progress.computed(len(batch) * context)
        if cuda:
            torch.cuda.synchronize(self.device)  # once per shard, before the host buffers are read
        if finite is not None:
            finite.update({h: not bool(b) for h, b in bad.items()})
        return outs

    def _smaller(self, size: int, context: int, error: str) -> int:
        """After an out-of-memory error at ``size``: half of it, remembered for the rest of this process."""
        if size == 1:
            raise ActcacheError(
                f"the forward pass does not fit in {self.device}'s memory even one sequence of "
                f"{context} tokens at a time ({error}); free the device, lower --context-size or "
                "use --model-dtype bfloat16"
            )
        smaller = size // 2
        _FITS[self._fits_key(context)] = smaller
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # what the failed pass allocated goes back before the retry
        log.warning(
            "out of memory on %s with %d sequences of %d tokens per pass; continuing with %d",
            self.device,
            size,
            context,
            smaller,
        )
        return smaller


class Extractor(_Batched):
    """The bridge engine: TransformerLens hook points, any per-token hook."""

    def __init__(
        self, bridge: Any, hooks: str | Sequence[str], *, batch_size: int, out_dtype: torch.dtype | None = None
    ):
        self.bridge = bridge
        self._setup(bridge, hooks, batch_size, out_dtype)
        # Hooks TransformerLens keeps off open for the pass that needs them (``inputs.gates``): usually one pass.
        self._passes = gates.passes(self.hooks, gates.canonical_of(bridge))

    def _capture(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        got: dict[str, torch.Tensor] = {}
        for flags, hooks in self._passes:
            with gates.opened(self.bridge, flags):
                got.update(self._one_pass(tokens, attention_mask, hooks))
        return got

    def _one_pass(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor | None, hooks: list[str]
    ) -> dict[str, torch.Tensor]:
        got: dict[str, torch.Tensor] = {}
        wanted = len(hooks)

        def grab(act: torch.Tensor, hook: Any = None, *, name: str) -> None:
            got[name] = act
            if len(got) == wanted:
                raise _Reached

        fwd = [(h, lambda act, hook=None, _n=h: grab(act, hook, name=_n)) for h in hooks]
        try:
            masked = {} if attention_mask is None else {"attention_mask": attention_mask}
            self.bridge.run_with_hooks(tokens, fwd_hooks=fwd, return_type=None, **masked)
        except _Reached:
            pass
        return got


class HFExtractor(_Batched):
    """The hf-sdpa engine: the bare HF base model, residual-stream hooks only (see ``forward_engine``)."""

    def __init__(
        self, hf_model: Any, hooks: str | Sequence[str], *, batch_size: int, out_dtype: torch.dtype | None = None
    ):
        self.model = hf_model
        self._setup(hf_model, hooks, batch_size, out_dtype)
        self.layers = getattr(hf_model, FAST_MODEL_TYPES[hf_model.config.model_type])
        self.where: list[tuple[str, int, bool]] = []  # (hook, layer, output of the layer rather than its input)
        for h in self.hooks:
            m = _RESID.match(h)
            if m is None:
                raise ActcacheError(f"hook {h!r} needs the bridge engine, not hf-sdpa")
            layer, post = int(m.group(1)), m.group(2) in ("resid_post", "out")
            if layer >= len(self.layers):
                raise ActcacheError(f"hook {h!r} is past the {len(self.layers)} layers loaded")
            self.where.append((h, layer, post))

    def _capture(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        got: dict[str, torch.Tensor] = {}
        wanted = len(self.hooks)

        def keep(name: str, act: Any) -> None:
            got[name] = act[0] if isinstance(act, tuple) else act
            if len(got) == wanted:
                raise _Reached

        handles = []
        for h, layer, post in self.where:
            mod = self.layers[layer]
            if post:
                handles.append(mod.register_forward_hook(lambda _m, _a, out, _h=h: keep(_h, out)))
            else:
                handles.append(
                    mod.register_forward_pre_hook(
                        lambda _m, args, kwargs, _h=h: keep(_h, args[0] if args else kwargs["hidden_states"]),
                        with_kwargs=True,
                    )
                )
        try:
            self.model(input_ids=tokens, attention_mask=attention_mask, use_cache=False)
        except _Reached:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return got


# -- loading the hf-sdpa engine's model ----------------------------------------------------------
_HF: dict[tuple, Any] = {}
_HF_LOCK = threading.Lock()


def load_hf_stack(model: Any, n_layers: int, *, dtype: str = "float32", device: str = "cpu") -> Any:
    """The HF base model of ``model`` (a ResolvedModel) with its first ``n_layers`` blocks only, sdpa attention.

    Loaded once per process; a deeper request replaces a shallower one. Later blocks' weights are never
    read into memory, and there is no LM head.
    """
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    base = (model.pin, dtype, device)
    with _HF_LOCK:
        have = _HF.get(base)
        if have is None or have[0] < n_layers:
            folder = model.weights()  # fetched once (a hub commit), its own one-line error
            verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
            hf_logging.set_verbosity_error()  # "weights of layers n.. not used" is the point, not a problem
            hf_logging.disable_progress_bar()  # "Loading weights": a bar of its own beside actcache's status line
            try:
                hf = AutoModel.from_pretrained(
                    folder, attn_implementation="sdpa", num_hidden_layers=n_layers, dtype=getattr(torch, dtype)
                )
            except Exception as e:
                raise ActcacheError(f"cannot load model {model.spec.name!r} with transformers ({e})") from e
            finally:
                hf_logging.set_verbosity(verbosity)
                if bars:
                    hf_logging.enable_progress_bar()
            model.check_unchanged()  # what was read must be what the set key names
            _HF[base] = (n_layers, hf.to(device).eval())
        return _HF[base][1]


# -- one extraction step over several hooks, each on its engine -----------------------------------
class MultiExtractor:
    """Fills every hook with its engine: one pass per engine, each up to its deepest hook."""

    def __init__(self, parts: list[_Batched]):
        self.parts = parts

    def hook_shapes(self) -> dict[str, list[int]]:
        return {h: s for p in self.parts for h, s in p.hook_shapes().items()}

    def capture(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One batch through every engine (see ``_Batched.capture``)."""
        return {h: a for p in self.parts for h, a in p.capture(tokens, attention_mask).items()}

    def __call__(
        self,
        tokens: torch.Tensor,
        into: Callable[[str, tuple[int, ...]], torch.Tensor] | None = None,
        finite: dict[str, bool] | None = None,
        select: Mapping[str, Selection] | None = None,
    ) -> dict[str, torch.Tensor]:
        kw = {"select": select} if select else {}
        return {h: a for p in self.parts for h, a in p(tokens, into, finite, **kw).items()}


def extractor_for(
    model: Any,
    hooks: Sequence[str],
    *,
    batch_size: int,
    model_dtype: str = "float32",
    device: str = "auto",
    out_dtype: str | None = None,
    bridge: Any = None,
    engines: dict[str, str] | None = None,
) -> MultiExtractor:
    """The extraction step for ``hooks`` of ``model`` (a ResolvedModel); the bridge is loaded only if needed.

    ``engines`` are the ones the plan pinned in the set keys (by default decided here, the same way).
    """
    dev = pick_device(device)
    cast = getattr(torch, out_dtype) if out_dtype else None
    engines = engines or {h: forward_engine(h, model) for h in hooks}
    fast = [h for h in hooks if engines[h] == HF_SDPA]
    slow = [h for h in hooks if h not in fast]
    parts: list[_Batched] = []
    if fast:
        deepest = max(int(_RESID.match(h).group(1)) for h in fast)  # type: ignore[union-attr]  # fast: resid hooks
        hf = load_hf_stack(model, deepest + 1, dtype=model_dtype, device=dev)
        parts.append(HFExtractor(hf, fast, batch_size=batch_size, out_dtype=cast))
    if slow:
        if bridge is None:
            from actcache.inputs.model import load_bridge

            bridge = load_bridge(model, dtype=model_dtype, device=dev)
        parts.append(Extractor(bridge, slow, batch_size=batch_size, out_dtype=cast))
    return MultiExtractor(parts)
