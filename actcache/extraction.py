"""Run the model just far enough to fill the requested hooks, in batches, under ``torch.inference_mode``.

Hooks on the requested hook points copy the activations; once the last of them has fired the forward
pass is ended by raising, so later blocks, the final norm and the unembedding never run, whatever the
hook (this also covers hooks in the last block, where ``stop_at_layer`` would not stop before the
unembedding). Several hooks share one pass up to the deepest of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from actcache.errors import ActcacheError


class _Reached(Exception):
    """Raised from a hook to end the forward pass once every activation is captured."""


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class Extractor:
    def __init__(self, bridge: Any, hooks: str | Sequence[str], *, batch_size: int):
        self.bridge, self.batch_size = bridge, batch_size
        self.hooks = [hooks] if isinstance(hooks, str) else list(dict.fromkeys(hooks))
        self.device = next(bridge.parameters()).device

    def _capture(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        got: dict[str, torch.Tensor] = {}
        wanted = len(self.hooks)

        def grab(act: torch.Tensor, hook: Any = None, *, name: str) -> None:
            got[name] = act
            if len(got) == wanted:
                raise _Reached

        fwd = [(h, lambda act, hook=None, _n=h: grab(act, hook, name=_n)) for h in self.hooks]
        try:
            self.bridge.run_with_hooks(tokens, fwd_hooks=fwd, return_type=None)
        except _Reached:
            pass
        b, t = tokens.shape
        for h in self.hooks:
            act = got.get(h)
            if act is None:
                raise ActcacheError(f"hook {h!r} did not fire during the forward pass; pick another hook")
            if act.dim() < 3 or tuple(act.shape[:2]) != (b, t):
                raise ActcacheError(f"hook {h!r} gives shape {list(act.shape)}, not one vector per token "
                                    f"[batch={b}, pos={t}, ...]; pick a per-token hook such as hook_resid_post")
        return got

    def hook_shapes(self) -> dict[str, list[int]]:
        """Per-token shape of each hook's activation (e.g. [d_model] or [n_heads, d_head])."""
        with torch.inference_mode():
            probe = torch.zeros((1, 2), dtype=torch.long, device=self.device)
            return {h: list(a.shape[2:]) for h, a in self._capture(probe).items()}

    def __call__(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """{hook: activations ``[n_seq, context, d]``} (trailing hook dims flattened into d), on the CPU."""
        outs: dict[str, list[torch.Tensor]] = {h: [] for h in self.hooks}
        with torch.inference_mode():
            for start in range(0, len(tokens), self.batch_size):
                batch = tokens[start : start + self.batch_size].to(self.device, dtype=torch.long, non_blocking=True)
                for h, act in self._capture(batch).items():
                    outs[h].append(act.reshape(act.shape[0], act.shape[1], -1).to("cpu", non_blocking=True))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # once per shard, not per batch
        return {h: torch.cat(v) for h, v in outs.items()}
