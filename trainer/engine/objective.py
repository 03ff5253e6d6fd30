"""The module the DeepSpeed engine wraps: the model plus its diffusion loss.

Wrapping keeps DeepSpeed's forward/backward bookkeeping around the whole loss computation, and
holds the MoE marker (trainer/engine/parallel.py) beside the model rather than inside it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from model.diffusion import forward_loss


class DiffusionObjective(nn.Module):
    def __init__(self, model: nn.Module, moe_marker: Optional[nn.Module] = None):
        super().__init__()
        self.model = model
        if moe_marker is not None:
            self.moe_marker = moe_marker

    def forward(self, tokens_BL: torch.Tensor, u_B: torch.Tensor, token_u_BL: torch.Tensor,
                valid_BL: Optional[torch.Tensor] = None, prompt_BL: Optional[torch.Tensor] = None) -> dict:
        """{"loss": the tensor to backpropagate, "forward": the TrainingForward it came from}.

        A dict, not the TrainingForward itself: DeepSpeed 0.19 divides the gradient by the
        accumulation steps through a backward hook on the loss tensors it finds in the forward's
        output, and it looks only inside tensors, tuples, lists and dicts. Handed a dataclass it
        hooks nothing, and every accumulated gradient comes out accumulation-steps times too big."""
        fwd = forward_loss(self.model, tokens_BL, u_B, token_u_BL, valid_BL, prompt_BL)
        return {"loss": fwd.loss, "forward": fwd}
