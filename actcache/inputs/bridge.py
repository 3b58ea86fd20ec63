"""The TransformerBridge with its weights, loaded once per process and reused across shards."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from actcache.errors import ActcacheError
from actcache.inputs import hub

if TYPE_CHECKING:
    from actcache.inputs.model import ResolvedModel


_LOADED: dict[tuple, Any] = {}
_LOAD_LOCK = threading.Lock()


def load_bridge(model: ResolvedModel, *, dtype: str = "float32", device: str = "cpu") -> Any:
    """The TransformerBridge for ``model`` with its weights, loaded once per process and reused across shards."""
    import torch

    key = (model.pin, dtype, device)
    with _LOAD_LOCK:
        if key not in _LOADED:
            from transformer_lens.model_bridge import TransformerBridge
            from transformers.utils import logging as hf_logging

            folder = model.weights()  # fetched once (a hub commit), its own one-line error
            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # "Loading weights": a bar of its own beside actcache's status line
            try:
                bridge = TransformerBridge.boot_transformers(
                    folder,
                    device=device,
                    dtype=getattr(torch, dtype),
                    trust_remote_code=model.spec.trust_remote_code,
                    tokenizer=model.tokenizer,
                )
            except ActcacheError:
                raise
            except Exception as e:
                raise ActcacheError(
                    f"cannot load model {model.spec.name!r} with TransformerLens ({hub.first_line(e)})"
                ) from e
            finally:
                if bars:
                    hf_logging.enable_progress_bar()
            model.check_unchanged()
            bridge.eval()
            _LOADED[key] = bridge
        return _LOADED[key]
