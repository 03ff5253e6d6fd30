"""Learning-rate multipliers: linear warmup, then cosine or warmup-stable-decay (WSD).

The schedule's length is `train.schedule_steps` (default `train.max_steps`), so a run can stop
early and later continue on the same curve.
"""
from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR


def lr_multiplier(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float,
                  decay_fraction: float = 0.2) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_start = total - int(decay_fraction * total)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
        return 1.0 - (1 - min_ratio) * progress
    raise ValueError(f"optim.schedule={schedule!r} must be cosine or wsd")


def build_scheduler(optimizer, cfg) -> LambdaLR:
    o, t = cfg.optim, cfg.train
    total = t.schedule_steps or t.max_steps

    def fn(step: int) -> float:   # a closure, not an object: LambdaLR then saves only its step
        return lr_multiplier(step, warmup=o.warmup_steps, total=total, schedule=o.schedule,
                             min_ratio=o.min_lr_ratio, decay_fraction=o.decay_fraction)
    return LambdaLR(optimizer, fn)
