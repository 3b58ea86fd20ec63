"""Manual check (not run by CI): SAELens's own training path reads an `actcache export --format saelens` folder.

SAELens pins transformer-lens < 4, so it lives in a venv of its own (torch's CPU wheel first):

    python3 -m venv /tmp/saelens-venv
    /tmp/saelens-venv/bin/pip install torch==2.13.0
    /tmp/saelens-venv/bin/pip install sae-lens                      # 6.54.12 when this was written
    .venv/bin/actcache export SET /tmp/sl --format saelens           # any set; here with actcache's venv
    /tmp/saelens-venv/bin/python bench/saelens_check.py /tmp/sl --steps 20

It trains a standard SAE for a few steps with ``LanguageModelSAETrainingRunner`` and
``use_cached_activations=True`` pointed at the folder, exactly as a SAELens user would, and checks that the
activations SAELens's ActivationsStore hands the trainer are the exported ones. No hub access: the model
SAELens wants beside the cache is a random-weight HookedTransformer of the set's width (it only serves
evaluations, which are off), and the text dataset is a stub (the cache replaces it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="an `actcache export --format saelens` folder")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64, help="train_batch_size_tokens")
    args = ap.parse_args(argv)

    import datasets
    import sae_lens
    import torch
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAEConfig
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    meta = json.loads((Path(args.folder) / "actcache.json").read_text())["manifest"]
    hook, d, ctx = meta["hook"], meta["d"], meta["key"]["tokens"]["context_size"]
    ds = datasets.load_from_disk(args.folder)
    print(f"sae-lens {sae_lens.__version__}, datasets {datasets.__version__}, torch {torch.__version__}")
    print(f"folder: {len(ds)} sequences, features {ds.features}")

    model = HookedTransformer(
        HookedTransformerConfig(
            n_layers=meta["layer"] + 1,
            d_model=d,
            n_ctx=max(ctx, 8),
            d_head=max(1, d // 4),
            n_heads=4,
            d_vocab=1 << 16,
            act_fn="gelu",
        )
    )
    stub = datasets.Dataset.from_dict({"tokens": [[0] * ctx] * 4})
    cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(d_in=d, d_sae=4 * d),
        model_name="actcache-export",
        hook_name=hook,
        dataset_path="unused",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=ctx,
        use_cached_activations=True,
        cached_activations_path=args.folder,
        training_tokens=args.steps * args.batch,
        train_batch_size_tokens=args.batch,
        store_batch_size_prompts=2,
        n_batches_in_buffer=2,
        device="cpu",
        dtype="float32",
        n_eval_batches=0,
        n_checkpoints=0,
        output_path=None,
        logger=LoggingConfig(log_to_wandb=False),
        verbose=False,
    )
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=stub, override_model=model)

    # What the store reads is the folder's data: the first batch equals the first sequences, in order.
    acts, tokens = runner.activations_store.get_raw_llm_batch()  # store_batch_size_prompts=2 sequences
    runner.activations_store.current_row_idx = 0  # training starts from the first row again
    first = torch.tensor(ds.with_format("numpy")[0:2][hook], dtype=torch.float32).reshape(-1, d)
    same = torch.equal(acts[: len(first)].float(), first)
    same_tokens = torch.equal(
        tokens[: 2 * ctx].long(), torch.tensor(ds.with_format("numpy")[0:2]["token_ids"]).reshape(-1).long()
    )
    print(f"store batch equals the exported activations: {same}; token ids: {same_tokens}")

    before = runner.sae.W_dec.detach().clone()
    sae = runner.run()
    w = sae.W_dec.detach()
    trained = bool(torch.isfinite(w).all()) and not torch.equal(w, before)
    print(f"trained {args.steps} steps of {args.batch} tokens: W_dec {tuple(w.shape)} finite and updated: {trained}")
    return 0 if same and same_tokens and trained else 1


if __name__ == "__main__":
    sys.exit(main())
