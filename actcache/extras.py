"""Optional dependencies: reading, verifying, shuffling, exporting and pushing sets need only the base install;
extracting needs the ``extract`` extra (TransformerLens, transformers, Prefect), which trainers pinned to other
versions of them (SAELens pins TransformerLens 3) can leave out."""

from __future__ import annotations

import importlib.util

from actcache.errors import ActcacheError

EXTRACT = {"prefect": "prefect", "transformer_lens": "transformer-lens", "transformers": "transformers"}
"""Modules extraction imports, and the distributions that provide them."""


def require_extract(what: str) -> None:
    """Refuse ``what`` in one line, naming the extra to install, where the extraction dependencies are missing."""
    missing = [dist for module, dist in EXTRACT.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ActcacheError(
            f"{what} needs actcache's extraction extra ({', '.join(missing)} not installed); install it with "
            "pip install 'actcache[extract]'"
        )
