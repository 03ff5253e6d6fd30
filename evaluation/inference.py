"""What every inference tool shares: the rule that turns a partly masked sequence into the mask
ratio r the expert-choice capacity schedule needs, and where a loaded model lives.

    r_B = mask_ratio(x_BL, valid_BL, mask_id)     # masked / non-pad, per sequence, as in pretraining

Legend: B batch, L length.
"""
from __future__ import annotations

import torch

from model.moe.dispatch import AllToAllDispatcher

def mask_ratio(x_BL: torch.Tensor, valid_BL: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Fraction of the non-pad positions that are currently masked, prompt included.

    This is r as pretraining sees it (no prompt there: every non-pad position can be masked), so an
    expert-choice model gets the capacity it learned for a sequence with that much of it hidden.
    A prompted sequence with one masked token has r = 1/L, not 1. A row of pads gets r = 0.
    """
    masked = ((x_BL == mask_id) & valid_BL).sum(1).to(torch.float32)
    return masked / valid_BL.sum(1).clamp_min(1).to(torch.float32)


def expert_parallel(model) -> bool:
    """True when the model's experts are split over ranks: every forward is then a collective
    whose all-to-all sizes the ranks agree on from shapes, so all ranks must run forwards of the
    same shape (see model/moe/dispatch.py)."""
    layers = model.moe_layers() if hasattr(model, "moe_layers") else []
    return any(isinstance(layer.dispatcher, AllToAllDispatcher) for layer in layers)


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:   # a parameter-free stand-in model (tests)
        return torch.device("cpu")
