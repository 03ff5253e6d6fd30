"""Validation ELBO on a fixed, seeded grid of mask ratios, comparable across runs and routers.

Each validation batch is evaluated at every grid ratio t_j = (j + 0.5) / n (one per bin centre),
with per-token noise from `eval.seed`, so two runs (EC vs TC, or two schedules) see exactly the
same masks. Batches are split across ranks (every rank must run forwards under expert
parallelism), and ELBO numerators and token counts are summed across ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from model.diffusion import diffusion_loss, loss_by_ratio_bin, mask_tokens


@torch.no_grad()
def evaluate(model, batches: list, cfg, rank: int, world: int, device) -> dict:
    """Returns {"val/loss": ELBO, "val/loss_bin/00": ..., ...}; same value on every rank."""
    n = cfg.eval.num_ratio_points
    was_training = model.training
    model.eval()
    num = torch.zeros(n, dtype=torch.float64)
    cnt = torch.zeros(n, dtype=torch.float64)
    g = torch.Generator().manual_seed(cfg.eval.seed)
    # a batch is a token tensor (pretraining) or (tokens, prompt mask) (supervised fine-tuning)
    batches = [b if isinstance(b, tuple) else (b, None) for b in batches]
    noise = [torch.rand(n, *b[0].shape, generator=g) for b in batches]   # same stream on every rank
    rounds = -(-len(batches) // world)
    for r in range(rounds):
        # every rank runs the same number of forwards (expert parallelism all-to-alls in each);
        # a rank with no batch left repeats batch 0 and discards the result
        i = r * world + rank
        real = i < len(batches)
        (tokens, prompt), token_u = (batches[i], noise[i]) if real else (batches[0], noise[0])
        tokens = tokens.to(device)
        prompt = None if prompt is None else prompt.to(device)
        for j in range(n):
            t = torch.full((tokens.shape[0],), (j + 0.5) / n, device=device)
            masked = mask_tokens(tokens, t, token_u[j].to(device), cfg.model.mask_id, prompt_BL=prompt)
            out = model(masked.noisy_BL, masked.ratio_B, None, logits_mask_BL=masked.mask_BL)
            if real:
                bn, bc = loss_by_ratio_bin(diffusion_loss(out.logits, tokens, masked, "elbo"), n)
                num += bn.cpu()
                cnt += bc.cpu()
    if world > 1:
        both = torch.stack([num, cnt])
        dist.all_reduce(both)
        num, cnt = both[0], both[1]
    model.train(was_training)
    row = {"val/loss": float(num.sum() / cnt.sum().clamp_min(1))}
    for j in range(n):
        row[f"val/loss_bin/{j:02d}"] = float(num[j] / cnt[j]) if cnt[j] > 0 else None
    return row


def evaluate_sources(model, batches: dict, weights: dict, cfg, rank: int, world: int, device) -> dict:
    """A data mixture's validation: `evaluate` on each source's own batches (the same grid and noise
    seed), logged as val/loss/<source>, and val/loss (and each bin) as their mean weighted by the
    mixture's normalized weights, so it reads like a single-source run's val/loss."""
    rows = {name: evaluate(model, b, cfg, rank, world, device) for name, b in batches.items()}
    out = {f"val/loss/{name}": row["val/loss"] for name, row in rows.items()}
    for key in rows[next(iter(rows))]:
        have = [(weights[name], row[key]) for name, row in rows.items() if row[key] is not None]
        total = sum(w for w, _ in have)
        out[key] = sum(w * v for w, v in have) / total if have else None
    return out
