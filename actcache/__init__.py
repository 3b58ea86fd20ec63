"""actcache: one transformer hook's activations, extracted once, stored as content-addressed shards."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "__version__",
    "extract",
    "open_set",
    "ExtractConfig",
    "ActcacheError",
    "ActivationDataset",
    "forever",
    "load_examples",
]

if TYPE_CHECKING:
    from actcache.api import extract
    from actcache.config import ExtractConfig
    from actcache.errors import ActcacheError
    from actcache.read.dataset import ActivationDataset
    from actcache.read.examples import load_examples
    from actcache.read.forever import forever
    from actcache.read.reader import open_set


def __getattr__(name: str) -> Any:
    # Lazy: `import actcache` must not pull in torch/prefect before they are needed.
    if name == "__version__":  # one source of truth: pyproject's version, as installed
        from importlib.metadata import version

        return version("actcache")
    if name == "extract":
        from actcache.api import extract

        return extract
    if name == "load_examples":
        from actcache.read.examples import load_examples

        return load_examples
    if name == "open_set":
        from actcache.read.reader import open_set

        return open_set
    if name == "ExtractConfig":
        from actcache.config import ExtractConfig

        return ExtractConfig
    if name == "ActcacheError":
        from actcache.errors import ActcacheError

        return ActcacheError
    if name == "ActivationDataset":
        from actcache.read.dataset import ActivationDataset

        return ActivationDataset
    if name == "forever":
        from actcache.read.forever import forever

        return forever
    raise AttributeError(name)
