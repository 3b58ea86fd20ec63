"""Which forward engine computes a hook: a pure function of the hook name and the model's config.

Kept apart from ``extraction`` (which needs torch) so that a plan, which puts the engine in each set's key,
can be made without importing torch (see ``extraction`` for what the engines are).
"""

from __future__ import annotations

import re
from typing import Any

BRIDGE, HF_SDPA = "bridge", "hf-sdpa"
# model_type -> attribute of the HF base model holding its decoder layers. Only architectures whose fast
# path is tested against the bridge (tests/actcache/extraction/test_forward_fast.py) are listed.
FAST_MODEL_TYPES = {"gpt2": "h", "llama": "layers", "gpt_neox": "layers"}
_RESID = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|in|resid_post|out)$")


def forward_engine(hook: str, model: Any) -> str:
    """The engine that computes ``hook`` for ``model`` (a ResolvedModel): a pure function of names and config."""
    if model.spec.trust_remote_code or model.model_type not in FAST_MODEL_TYPES:
        return BRIDGE
    return HF_SDPA if _RESID.match(hook) else BRIDGE
