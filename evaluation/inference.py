"""What every inference tool shares: the rule that turns a partly masked sequence into the mask
ratio r the expert-choice capacity schedule needs, and where a loaded model lives.

    r_B = mask_ratio(x_BL, valid_BL, mask_id, prompt_BL, over)   # model.diffusion.mask_ratio's rule

Legend: B batch, L length.
"""
from __future__ import annotations

from typing import Optional

import torch

from model.diffusion import mask_ratio as ratio_of_mask
from model.moe.dispatch import AllToAllDispatcher


def mask_ratio(x_BL: torch.Tensor, valid_BL: torch.Tensor, mask_id: int,
               prompt_BL: Optional[torch.Tensor] = None, over: str = "sequence") -> torch.Tensor:
    """r_b of a partly masked sequence, by the rule its model was trained with (the run's
    `diffusion.mask_ratio_over`): masked / non-pad positions ("sequence", pretraining: a prompted
    sequence with one masked token has r = 1/L) or masked / non-pad positions outside the prompt
    ("response", supervised fine-tuning). A row of pads gets r = 0.
    """
    return ratio_of_mask(x_BL == mask_id, valid_BL, prompt_BL, over)


def model_mask_ratio(model, x_BL: torch.Tensor, valid_BL: torch.Tensor,
                     prompt_BL: Optional[torch.Tensor] = None) -> torch.Tensor:
    """mask_ratio with the model's own mask id and rule."""
    cfg = model.cfg
    return mask_ratio(x_BL, valid_BL, cfg.model.mask_id, prompt_BL, cfg.diffusion.mask_ratio_over)


def expert_parallel(model) -> bool:
    """True when the model's experts are split over ranks: every forward is then a collective
    whose all-to-all sizes the ranks agree on from shapes, so all ranks must run forwards of the
    same shape (see model/moe/dispatch.py)."""
    layers = model.moe_layers() if hasattr(model, "moe_layers") else []
    return any(isinstance(layer.dispatcher, AllToAllDispatcher) for layer in layers)


def any_rank(model, flag: bool) -> bool:
    """`flag` of any rank of the model's expert-parallel group (this rank's own flag without
    one): a sampler's data-dependent decision (one more step? stop now?) must be the same on
    every rank there, since every forward is a collective all of them take part in."""
    layers = model.moe_layers() if hasattr(model, "moe_layers") else []
    group = next((l.dispatcher.group for l in layers if isinstance(l.dispatcher, AllToAllDispatcher)), None)
    if group is None:
        return flag
    import torch.distributed as dist
    t = torch.full((1,), int(flag), dtype=torch.long, device=model_device(model))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:   # a parameter-free stand-in model (tests)
        return torch.device("cpu")
