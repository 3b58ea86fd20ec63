"""actcache: one transformer hook's activations, extracted once, stored as content-addressed shards."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["extract", "open_set", "ExtractConfig", "ActcacheError", "ActivationDataset", "forever"]

if TYPE_CHECKING:
    from actcache.api import extract
    from actcache.config import ExtractConfig
    from actcache.dataset import ActivationDataset
    from actcache.endless import forever
    from actcache.errors import ActcacheError
    from actcache.reader import open_set


def __getattr__(name: str) -> Any:
    # Lazy: `import actcache` must not pull in torch/prefect before they are needed.
    if name == "extract":
        from actcache.api import extract

        return extract
    if name == "open_set":
        from actcache.reader import open_set

        return open_set
    if name == "ExtractConfig":
        from actcache.config import ExtractConfig

        return ExtractConfig
    if name == "ActcacheError":
        from actcache.errors import ActcacheError

        return ActcacheError
    if name == "ActivationDataset":
        from actcache.dataset import ActivationDataset

        return ActivationDataset
    if name == "forever":
        from actcache.endless import forever

        return forever
    raise AttributeError(name)
