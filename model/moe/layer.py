"""MoELayer: router + routed SwiGLU experts + optional shared experts, as a drop-in nn.Module.

    out = MoELayer(d_model, moe_cfg)(x_BLD, mask_ratio_B, valid_BL)
    out.hidden  # [B, L, D]
    out.loss    # z-loss (+ TC balance loss), already weighted: add it to the training loss
    out.stats   # detached numbers for logging

The layer never talks to other ranks itself: a dispatcher does (dispatch.py). Pass an
expert-parallel process group to split the experts across its ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..config import MoEConfig, resolve_moe, shared_hidden, uses_expert_bias, validate_moe
from .capacity import TimestepCapacity
from .dispatch import AllToAllDispatcher, LocalDispatcher
from .experts import Experts, SwiGLU
from .routing import Routing, at_least_fp32, ec_sizes, expert_choice, switch_aux_loss, token_choice, \
    token_scores, update_expert_bias, z_loss


@dataclass
class MoEStats:
    """Detached per-layer numbers for this forward (local micro-batch)."""
    mean_k: torch.Tensor             # experts actually applied per valid token
    drop_frac: torch.Tensor          # EC: tokens no expert picked; TC: assignments over capacity
    tokens_per_expert: torch.Tensor  # [E] load before drops (global expert index)
    assignments: torch.Tensor        # (token, expert) pairs computed: routed FLOPs = 6*D*H*this
    z_loss: torch.Tensor
    aux_loss: torch.Tensor


@dataclass
class MoEOutput:
    hidden: torch.Tensor
    loss: torch.Tensor
    stats: MoEStats


def router_logits(x_BLD: torch.Tensor, w_ED: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Router logits, fp32 (or float64) out, from a matmul in `precision` (moe.router_precision).

    fp32, the default: even under bf16 training, since top-c selection is sensitive to rounding.
    bf16: both operands rounded to bf16, accumulated in fp32, then fp32 (a GPU's tensor cores
    instead of its CUDA cores: the fp32 router is ~a quarter of a dense layer's time at owt's
    shape). tf32: an fp32 matmul with TF32 allowed for it on CUDA; CPUs have no TF32, so fp32
    there, and under torch.compile the global setting rules (flipping it would break the graph).
    """
    if precision == "bf16":
        return F.linear(x_BLD.to(torch.bfloat16), w_ED.to(torch.bfloat16)).float()
    x32, w32 = at_least_fp32(x_BLD), at_least_fp32(w_ED)
    if precision == "tf32" and x32.is_cuda and not torch.compiler.is_compiling():
        saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return F.linear(x32, w32)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved
    if precision not in ("fp32", "tf32"):
        raise ValueError(f"router precision {precision!r} must be fp32, tf32 or bf16")
    return F.linear(x32, w32)


class MoELayer(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig, ep_group=None, layer_idx: int = 0,
                 init_seed: Optional[int] = 0, capacity: Optional[TimestepCapacity] = None):
        """init_seed: seed for the expert weights (None: the enclosing model initializes them).
        capacity: the run's expert-choice schedule, built once by ModelConfig (with `cfg` already
        resolved); a drop-in layer given none resolves and validates its own config."""
        super().__init__()
        if cfg.router == "dense":
            raise ValueError("MoELayer needs moe.router expert_choice or token_choice, not dense")
        if capacity is None:
            cfg, capacity = resolve_moe(cfg)
            validate_moe(cfg, capacity)
        self.cfg, self.d_model, self.layer_idx = cfg, d_model, layer_idx
        E = cfg.num_experts
        ep_size = dist.get_world_size(ep_group) if ep_group is not None else 1
        ep_rank = dist.get_rank(ep_group) if ep_group is not None else 0
        self.dispatcher = AllToAllDispatcher(ep_group, E) if ep_size > 1 else LocalDispatcher()
        num_local = E // ep_size
        self.router = nn.Linear(d_model, E, bias=False)
        self.experts = Experts(num_local, d_model, cfg.expert_hidden, first_expert=ep_rank * num_local)
        self.shared = (SwiGLU(d_model, cfg.num_shared_experts * shared_hidden(cfg))
                       if cfg.num_shared_experts else None)
        self.capacity: Optional[TimestepCapacity] = capacity   # None for token choice
        # a static schedule's k is a constant: resolve it once, not every forward
        self.static_k = (capacity.static_k() if capacity is not None and capacity.schedule == "static"
                         else None)
        # aux-loss-free balancing (TC): selection-only bias, a buffer so checkpoints keep it
        self.register_buffer("expert_bias", torch.zeros(E), persistent=True)
        if init_seed is not None:
            self.experts.init_weights(init_seed, layer_idx, std_in=0.02, std_out=0.02)

    def forward(self, x_BLD: torch.Tensor, mask_ratio_B: Optional[torch.Tensor] = None,
                valid_BL: Optional[torch.Tensor] = None, sizes: Optional[tuple] = None) -> MoEOutput:
        """sizes: expert choice's host-int sizes, ec_sizes() of this input, if already read."""
        B, L, D = x_BLD.shape
        x_TD = x_BLD.reshape(B * L, D)
        logits_BLE = router_logits(x_BLD, self.router.weight, self.cfg.router_precision)
        routing, aux = self.route(logits_BLE, mask_ratio_B, valid_BL, sizes)
        out_TD = self.routed_experts(x_TD, routing)
        valid_T = valid_BL.reshape(-1) if valid_BL is not None else None
        zl = z_loss(logits_BLE.reshape(B * L, -1), valid_T)
        loss = self.cfg.z_loss_coef * zl + self.cfg.aux_loss_coef * aux
        n_valid = routing.num_valid_tokens.clamp_min(1)
        assignments = routing.num_assignments()
        stats = MoEStats(mean_k=(assignments / n_valid).detach(), drop_frac=routing.drop_frac.detach(),
                         tokens_per_expert=routing.tokens_per_expert.detach(),
                         assignments=assignments.detach(), z_loss=zl.detach(), aux_loss=aux.detach())
        return MoEOutput(out_TD.view(B, L, D), loss, stats)

    def routed_experts(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        """dispatch -> experts -> combine, plus the shared experts. The experts apply the gates in
        their hidden layer (half the width of their output); one process with fixed capacity takes
        the fused path. Under expert parallelism the shared experts run while the dispatched rows
        are in flight (and their backward while the rows' gradients travel back)."""
        shared = (lambda: self.shared(x_TD)) if self.shared is not None else None
        if routing.fixed and isinstance(self.dispatcher, LocalDispatcher):
            out_TD = self.experts.forward_local(x_TD, routing.token_idx, routing.gate)
            return out_TD + shared() if shared else out_TD
        batch = self.dispatcher.dispatch(x_TD, routing, meanwhile=shared)
        shared_TD = batch.overlapped
        if routing.fixed:
            out_TD = self.dispatcher.experts_then_combine(batch, routing, self.experts.forward_fixed)
        else:
            batch.x = self.experts.forward_ragged(batch.x, batch.counts, batch.gate)
            batch.gate = None   # applied: combine() must not apply it again
            out_TD = self.dispatcher.combine(batch, routing)
        return out_TD + shared_TD if shared else out_TD

    def route(self, logits_BLE: torch.Tensor, mask_ratio_B: Optional[torch.Tensor],
              valid_BL: Optional[torch.Tensor], sizes: Optional[tuple] = None) -> tuple[Routing, torch.Tensor]:
        B, L, E = logits_BLE.shape
        zero = logits_BLE.new_zeros(())
        if self.cfg.router == "expert_choice":
            k = self.expert_choice_k(mask_ratio_B, B)
            return expert_choice(logits_BLE, k, valid_BL, self.cfg.ec_scope, self.cfg.gate_scaling,
                                 self.cfg.num_shared_experts, self.cfg.ec_batch_capacity, sizes), zero
        logits_TE = logits_BLE.reshape(B * L, E)
        valid_T = valid_BL.reshape(-1) if valid_BL is not None else None
        use_bias = uses_expert_bias(self.cfg) or self.cfg.expert_bias_in_gates
        bias = self.expert_bias if use_bias else None
        routing = token_choice(logits_TE, self.cfg.k, self.cfg.capacity_factor, score_fn=self.cfg.score_fn,
                               renormalize=self.cfg.renormalize, expert_bias=bias,
                               bias_in_gates=self.cfg.expert_bias_in_gates, valid_T=valid_T)
        aux = (switch_aux_loss(token_scores(logits_TE, self.cfg.score_fn), routing, valid_T)
               if self.cfg.aux_loss_coef > 0 else zero)
        return routing, aux

    def ec_sizes(self, mask_ratio_B: Optional[torch.Tensor], valid_BL: Optional[torch.Tensor],
                 B: int, L: int) -> Optional[tuple]:
        """Expert choice's selection sizes for this input as host ints (one host sync), or None
        where the shapes alone decide them (static capacity without pads, token choice). They
        depend only on the schedule, the mask ratios and the pads, which every MoE layer of a
        model shares: the model reads them once per forward and hands them to each layer, so a
        compiled block never stops for them (docs/speed.md)."""
        if self.cfg.router != "expert_choice" or (self.static_k is not None and valid_BL is None):
            return None
        k = self.expert_choice_k(mask_ratio_B, B)
        dev = self.router.weight.device
        L_B = valid_BL.sum(1).long() if valid_BL is not None else torch.full((B,), L, device=dev)
        k_B = torch.full((B,), k, dtype=torch.long, device=dev) if isinstance(k, int) else k.to(dev).long().expand(B)
        return ec_sizes(L_B, k_B, self.cfg.num_experts, self.cfg.ec_scope, self.cfg.ec_batch_capacity)

    def expert_choice_k(self, mask_ratio_B: Optional[torch.Tensor], batch: int):
        """An int for static capacity (shapes alone decide C), else a LongTensor k_B."""
        if self.static_k is not None:
            return self.static_k
        if mask_ratio_B is None:
            raise ValueError(f"capacity schedule {self.capacity.schedule!r} needs the per-sequence mask ratio")
        return self.capacity.k(mask_ratio_B.detach())

    @torch.no_grad()
    def update_expert_bias(self, load_E: torch.Tensor) -> None:
        """Once per optimizer step, with the load summed over micro-batches and ranks (the
        trainer's ExpertBiasBalancer calls it only when the bias is in use)."""
        update_expert_bias(self.expert_bias, load_E, self.cfg.bias_update_rate)
