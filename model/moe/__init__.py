"""Mixture-of-experts layers for diffusion LMs: expert-choice and token-choice routing,
timestep-aware capacity, stacked experts and a dispatch/combine communication interface."""
from .capacity import SCHEDULES, FlopMatchError, TimestepCapacity, build_capacity, solve_capacity, solve_k_max
from .dispatch import AllToAllDispatcher, ExpertBatch, LocalDispatcher
from .experts import Experts, SwiGLU
from .layer import MoELayer, MoEOutput, MoEStats
from .routing import Routing, expert_choice, switch_aux_loss, token_choice, update_expert_bias, z_loss

__all__ = ["SCHEDULES", "FlopMatchError", "TimestepCapacity", "build_capacity", "solve_capacity", "solve_k_max",
           "AllToAllDispatcher", "ExpertBatch", "LocalDispatcher", "Experts", "SwiGLU", "MoELayer",
           "MoEOutput", "MoEStats", "Routing", "expert_choice", "switch_aux_loss", "token_choice",
           "update_expert_bias", "z_loss"]
