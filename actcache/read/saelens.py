"""SAELens trains from a set in place: its ``SAETrainer`` pulls batches from ``ActivationDataset``.

SAELens 6's ``SAETrainer(cfg, sae, data_provider)`` takes any iterator of ``[batch, d_in]`` tensors; its
``LanguageModelSAETrainingRunner`` is only what builds that iterator from a model or a cached-activations folder.
Feeding the trainer directly needs no model, no text dataset and no copy of the set. SAELens is imported only
inside these functions: actcache itself never needs it (install it beside actcache, see docs/training.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from actcache.errors import ActcacheError
from actcache.read.dataset import ActivationDataset, _normalizer
from actcache.read.forever import forever


def _one_set(ds: ActivationDataset) -> None:
    """SAELens trains on one hook's rows: a dataset of several sets (tuples of batches) is refused up front."""
    if ds.several:
        raise ActcacheError(
            "SAELens's SAETrainer takes one tensor per batch; read one set (ActivationDataset(url, ...)), not a list"
        )


def data_provider(ds: ActivationDataset, dtype: torch.dtype = torch.float32) -> Iterator[torch.Tensor]:
    """SAELens's ``DataProvider``: the dataset's batches, epoch after epoch, in ``dtype``."""
    _one_set(ds)
    for batch in forever(ds):
        if not isinstance(batch, torch.Tensor):
            raise ActcacheError("SAELens needs batches of activations only: leave with_tokens/with_positions off")
        yield batch.to(dtype)


def metadata(ds: ActivationDataset) -> dict[str, Any]:
    """What SAELens's own runner records in ``sae.cfg.metadata``, from the set (``dataset_path`` is its URL)."""
    _one_set(ds)
    s = ds.set
    m = s.manifest
    return {
        "dataset_path": s.url,
        "hook_name": m["hook"],
        "model_name": (m.get("model") or {}).get("name"),
        "context_size": s.context_size,
        "prepend_bos": bool(s.tokenization.get("prepend_bos")),
        "exclude_special_tokens": list(ds.exclude) or False,
        "actcache_set_id": s.set_id,
        "actcache_drop_bos": ds.drop_bos,
    }


def train(
    ds: ActivationDataset,
    sae: Any,
    *,
    training_tokens: int,
    output_path: str | Path | None = None,
    **trainer: Any,
) -> Any:
    """Train the SAELens training SAE ``sae`` (e.g. ``StandardTrainingSAE``) on ``ds``'s rows; return it.

    ``trainer`` goes to ``sae_lens.SAETrainerConfig`` (``lr``, ``device``, ``logger``, ``n_checkpoints``,
    ``checkpoint_path``, ...); the batch size is the dataset's. With the SAE config's
    ``normalize_activations="expected_average_only_in"``, the scale is the set's exact one for the rows read
    (``ds.stats["scale"]``) rather than SAELens's estimate, and SAELens folds it into the weights at the end, so
    the saved SAE reads raw activations. ``sae.cfg.metadata`` names the set (``dataset_path`` is its URL).
    ``output_path``: save the trained SAE there (``sae.save_model``) too.
    """
    _one_set(ds)  # before the statistics: a tuple of them is no set's fault
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig

    if ds.normalize is not None:
        raise ActcacheError(
            f"train() reads raw activations: make the dataset with normalize=None (not {ds.normalize!r}) and set "
            "normalize_activations='expected_average_only_in' in the SAE config; the set's exact scale is then "
            "used and folded into the saved SAE's weights"
        )
    if sae.cfg.d_in != ds.d:
        raise ActcacheError(f"the SAE's d_in is {sae.cfg.d_in} but the set's rows have d={ds.d}; use d_in={ds.d}")
    for k, v in metadata(ds).items():  # before fit, so checkpoints carry them too
        setattr(sae.cfg.metadata, k, v)
    trainer.setdefault("lr_end", trainer.get("lr", 3e-4) / 10)  # SAELens's runner config sets this default
    cfg = SAETrainerConfig(total_training_samples=training_tokens, train_batch_size_samples=ds.batch_size, **trainer)
    fit = SAETrainer(cfg, sae, data_provider(ds, sae.W_enc.dtype))
    if sae.cfg.normalize_activations == "expected_average_only_in":
        # The dataset's own refusals (no statistics, exclusions they cannot follow) apply here too.
        factor, _ = _normalizer(ds.set, "scale", ds.stats, ds.exclude, ds.drop_bos)
        fit.activation_scaler.scaling_factor = float(factor[0])  # fit() then skips its estimate and folds this one
    trained = fit.fit()
    if output_path is not None:
        trained.save_model(str(output_path))
    return trained
