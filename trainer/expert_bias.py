"""The one owner of token choice's aux-loss-free expert bias during training.

Each micro-batch's tokens per expert are added here (on the device, no host sync); after the
optimizer step the summed load is all-reduced once and every MoE layer's bias is updated with the
global load, identically on every rank, so the biases stay equal across ranks and layouts.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from model.config import uses_expert_bias


class ExpertBiasBalancer:
    def __init__(self, model, device, comm_device):
        self.layers = model.moe_layers() if uses_expert_bias(model.cfg.moe) else []
        self.device, self.comm_device = device, comm_device
        self.load = None

    @property
    def active(self) -> bool:
        return bool(self.layers)

    def add_micro(self, fwd) -> None:
        """One micro-batch's TrainingForward."""
        if not self.active:
            return
        load = torch.stack([st.tokens_per_expert.detach().to(torch.float64) for st in fwd.output.moe])
        self.load = load if self.load is None else self.load + load

    def step(self) -> None:
        """Collective (when active): after the optimizer step, with every micro-batch added."""
        if not self.active or self.load is None:
            return
        load = self.load.to(self.comm_device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(load)
        for layer, layer_load in zip(self.layers, load):
            layer.update_expert_bias(layer_load.to(self.device))
        self.load = None
