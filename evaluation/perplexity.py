"""Perplexity bound of a dataset split: the trainer's validation ELBO (trainer/validation.py), on one
process, for any checkpoint and any prepared split.

    python -m evaluation.perplexity RUN_DIR [--data DIR] [--split val] [--batches 16] [--batch-size 8]
        [--seq-len N] [--ratio-points 10] [--seed 0] [--json]

The ELBO per token, averaged over a fixed grid of mask ratios with fixed noise (so two runs are
scored on exactly the same masks), bounds the negative log-likelihood: exp(ELBO) is an upper
bound on perplexity. The per-bin losses show where the bound comes from.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

import torch


def perplexity_bound(model, cfg, data_dir: str, split: str = "val", batches: int = 16, batch_size: int = 8,
                     seq_len=None, ratio_points: int = 10, seed: int = 0) -> dict:
    """{"loss": ELBO nats/token, "ppl_bound": exp(loss), "loss_bin/00": ..., "tokens": scored tokens}."""
    from trainer.data import fixed_eval_batches
    from trainer.validation import evaluate
    from .inference import model_device
    from rundir.state import resolve_path
    seq_len = seq_len or cfg.train.seq_len
    data = fixed_eval_batches(os.path.join(resolve_path(data_dir), split), seq_len, batch_size, batches)
    ecfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, num_ratio_points=ratio_points, seed=seed))
    row = evaluate(model, data, ecfg, rank=0, world=1, device=model_device(model))
    out = {"loss": row["val/loss"], "ppl_bound": math.exp(row["val/loss"]),
           "tokens": sum(b.numel() for b in data)}
    out.update({k.replace("val/", ""): v for k, v in row.items() if k.startswith("val/loss_bin/")})
    return out


def main(argv=None) -> int:
    from evaluation.loading import load_run
    p = argparse.ArgumentParser(description="Validation ELBO / perplexity bound of an ecdlm run.")
    p.add_argument("run", help="run directory or checkpoint directory")
    p.add_argument("--data", help="prepared data directory (default: the run's data.path)")
    p.add_argument("--split", default="val")
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="default: the run's train.seq_len")
    p.add_argument("--ratio-points", type=int, default=10, help="mask-ratio grid size (one per bin)")
    p.add_argument("--seed", type=int, default=0, help="mask noise seed (the trainer uses eval.seed)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    model, cfg, _ = load_run(args.run, args.device)
    res = perplexity_bound(model, cfg, args.data or cfg.data.path, args.split, args.batches, args.batch_size,
                           args.seq_len, args.ratio_points, args.seed)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{args.split}: ELBO {res['loss']:.4f} nats/token, perplexity <= {res['ppl_bound']:.2f} "
              f"({res['tokens']} tokens)")
        print("  by mask ratio: " + "  ".join(f"{k[-2:]}:{v:.3f}" for k, v in res.items()
                                               if k.startswith("loss_bin/") and v is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
