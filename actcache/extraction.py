"""Run the model just far enough to fill one hook, in batches, under ``torch.inference_mode``.

A hook on the requested hook point copies the activation and raises, so the forward pass stops right
there: later blocks, the final norm and the unembedding never run, whatever the hook (this also covers
hooks in the last block, where ``stop_at_layer`` would not stop before the unembedding).
"""

from __future__ import annotations

from typing import Any

import torch

from actcache.errors import ActcacheError


class _Reached(Exception):
    """Raised from the hook to end the forward pass once the activation is captured."""


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class Extractor:
    def __init__(self, bridge: Any, hook: str, *, batch_size: int):
        self.bridge, self.hook, self.batch_size = bridge, hook, batch_size
        self.device = next(bridge.parameters()).device

    def _capture(self, tokens: torch.Tensor) -> torch.Tensor:
        box: list[torch.Tensor] = []

        def grab(act: torch.Tensor, hook: Any = None) -> None:
            box.append(act)
            raise _Reached

        try:
            self.bridge.run_with_hooks(tokens, fwd_hooks=[(self.hook, grab)], return_type=None)
        except _Reached:
            pass
        if not box:
            raise ActcacheError(f"hook {self.hook!r} did not fire during the forward pass; pick another hook")
        act = box[0]
        b, t = tokens.shape
        if act.dim() < 3 or tuple(act.shape[:2]) != (b, t):
            raise ActcacheError(f"hook {self.hook!r} gives shape {list(act.shape)}, not one vector per token "
                                f"[batch={b}, pos={t}, ...]; pick a per-token hook such as hook_resid_post")
        return act

    def hook_shape(self) -> list[int]:
        """Per-token shape of the hook's activation (e.g. [d_model] or [n_heads, d_head])."""
        with torch.inference_mode():
            probe = torch.zeros((1, 2), dtype=torch.long, device=self.device)
            return list(self._capture(probe).shape[2:])

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Activations ``[n_seq, context, d]`` (trailing hook dims flattened into d), on the CPU."""
        outs = []
        with torch.inference_mode():
            for start in range(0, len(tokens), self.batch_size):
                batch = tokens[start : start + self.batch_size].to(self.device, dtype=torch.long, non_blocking=True)
                act = self._capture(batch)
                outs.append(act.reshape(act.shape[0], act.shape[1], -1).to("cpu", non_blocking=True))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # once per shard, not per batch
        return torch.cat(outs)
